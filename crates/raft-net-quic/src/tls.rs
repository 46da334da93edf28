//! Certificates and TLS settings for mutual authentication inside a cluster.
//!
//! Every node holds a certificate signed by the cluster's CA whose subject
//! alternative name is `node-<id>.raft`. A node accepts a connection only from
//! a certificate of that CA, and only lets it speak for the id it names.

use crate::error::NetError;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName};
use rustls::RootCertStore;
use std::path::Path;
use std::sync::Arc;

/// The ALPN protocol name of this transport.
pub const ALPN: &[u8] = b"raft-quic/1";

/// The DNS name a node's certificate must carry.
pub fn node_name(id: u64) -> String {
    format!("node-{id}.raft")
}

/// One node's TLS material: the cluster CA and its own certificate and key.
#[derive(Debug)]
pub struct TlsMaterial {
    /// The cluster CA certificates (DER): usually one; two while the CA is
    /// being rotated. A peer whose certificate any of them signed is trusted.
    pub cas: Vec<CertificateDer<'static>>,
    /// This node's certificate chain (DER), leaf first.
    pub chain: Vec<CertificateDer<'static>>,
    /// This node's private key.
    pub key: PrivateKeyDer<'static>,
}

impl Clone for TlsMaterial {
    fn clone(&self) -> Self {
        TlsMaterial {
            cas: self.cas.clone(),
            chain: self.chain.clone(),
            key: self.key.clone_key(),
        }
    }
}

impl TlsMaterial {
    /// Reads `ca.pem`, `node-<id>.pem` and `node-<id>.key` from `dir`.
    pub fn load_dir(dir: impl AsRef<Path>, id: u64) -> Result<Self, NetError> {
        let dir = dir.as_ref();
        let read = |name: String| {
            let p = dir.join(&name);
            std::fs::read(&p).map_err(|e| NetError::Tls(format!("{}: {e}", p.display())))
        };
        let bad =
            |name: String, e: String| NetError::Tls(format!("{}: {e}", dir.join(name).display()));
        let ca_name = "ca.pem".to_string();
        // Several CA certificates may follow each other (CA rotation).
        let cas = CertificateDer::pem_slice_iter(&read(ca_name.clone())?)
            .collect::<Result<Vec<_>, _>>()
            .map_err(|e| bad(ca_name.clone(), e.to_string()))?;
        if cas.is_empty() {
            return Err(bad(ca_name, "no certificate in file".into()));
        }
        let cert_name = format!("node-{id}.pem");
        let chain = CertificateDer::pem_slice_iter(&read(cert_name.clone())?)
            .collect::<Result<Vec<_>, _>>()
            .map_err(|e| bad(cert_name.clone(), e.to_string()))?;
        if chain.is_empty() {
            return Err(bad(cert_name, "no certificate in file".into()));
        }
        let key_name = format!("node-{id}.key");
        let key = PrivateKeyDer::from_pem_slice(&read(key_name.clone())?)
            .map_err(|e| bad(key_name, e.to_string()))?;
        Ok(TlsMaterial { cas, chain, key })
    }
}

/// A generated cluster CA that can issue node certificates.
pub struct ClusterCa {
    cert: rcgen::Certificate,
    key: rcgen::KeyPair,
}

impl std::fmt::Debug for ClusterCa {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ClusterCa").finish_non_exhaustive()
    }
}

/// How long a generated CA certificate is valid: 10 years.
pub const CA_VALID_DAYS: i64 = 3650;
/// How long a node certificate is valid: 2 years (renew with
/// `raft-kv certs --add` after moving the old one aside).
pub const NODE_VALID_DAYS: i64 = 730;

/// From an hour ago (clocks differ a little) to `days` from now.
fn validity(days: i64) -> (time::OffsetDateTime, time::OffsetDateTime) {
    let now = time::OffsetDateTime::now_utc();
    (
        now - time::Duration::hours(1),
        now + time::Duration::days(days),
    )
}

fn gen_err(e: rcgen::Error) -> NetError {
    NetError::Tls(format!("certificate generation failed: {e}"))
}

impl ClusterCa {
    /// A new self-signed CA.
    pub fn generate() -> Result<Self, NetError> {
        let key = rcgen::KeyPair::generate().map_err(gen_err)?;
        Self::with_key(key)
    }

    /// The CA whose private key this is (`ca.key`): its certificate is made
    /// again from the key and the fixed name, so it is the one in `ca.pem`
    /// (same subject, same public key and key identifier) and what it
    /// issues chains to it.
    pub fn from_key_pem(key_pem: &str) -> Result<Self, NetError> {
        let key = rcgen::KeyPair::from_pem(key_pem).map_err(gen_err)?;
        Self::with_key(key)
    }

    fn with_key(key: rcgen::KeyPair) -> Result<Self, NetError> {
        let mut params = rcgen::CertificateParams::new(Vec::<String>::new()).map_err(gen_err)?;
        params.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
        params
            .distinguished_name
            .push(rcgen::DnType::CommonName, "raft cluster CA");
        params.key_usages = vec![
            rcgen::KeyUsagePurpose::KeyCertSign,
            rcgen::KeyUsagePurpose::CrlSign,
        ];
        (params.not_before, params.not_after) = validity(CA_VALID_DAYS);
        let cert = params.self_signed(&key).map_err(gen_err)?;
        Ok(ClusterCa { cert, key })
    }

    /// The CA's private key in PEM (keep it private: it signs members).
    pub fn key_pem(&self) -> String {
        self.key.serialize_pem()
    }

    /// The CA certificate in PEM.
    pub fn cert_pem(&self) -> String {
        self.cert.pem()
    }

    /// Issues a certificate for node `id`: returns (certificate PEM, key PEM).
    pub fn issue(&self, id: u64) -> Result<(String, String), NetError> {
        let key = rcgen::KeyPair::generate().map_err(gen_err)?;
        let mut params = rcgen::CertificateParams::new(vec![node_name(id)]).map_err(gen_err)?;
        params
            .distinguished_name
            .push(rcgen::DnType::CommonName, node_name(id));
        params.extended_key_usages = vec![
            rcgen::ExtendedKeyUsagePurpose::ServerAuth,
            rcgen::ExtendedKeyUsagePurpose::ClientAuth,
        ];
        (params.not_before, params.not_after) = validity(NODE_VALID_DAYS);
        let cert = params
            .signed_by(&key, &self.cert, &self.key)
            .map_err(gen_err)?;
        Ok((cert.pem(), key.serialize_pem()))
    }

    /// Issues node `id`'s material directly (for tests and in-process clusters).
    pub fn material(&self, id: u64) -> Result<TlsMaterial, NetError> {
        let (cert, key) = self.issue(id)?;
        let parse = |e: rustls::pki_types::pem::Error| NetError::Tls(e.to_string());
        Ok(TlsMaterial {
            cas: vec![CertificateDer::from_pem_slice(self.cert_pem().as_bytes()).map_err(parse)?],
            chain: vec![CertificateDer::from_pem_slice(cert.as_bytes()).map_err(parse)?],
            key: PrivateKeyDer::from_pem_slice(key.as_bytes()).map_err(parse)?,
        })
    }
}

/// Writes a new CA and a certificate per node into `dir`: `ca.pem`,
/// `ca.key`, `node-<id>.pem`, `node-<id>.key` (private keys created readable
/// by the owner only). Refuses a directory that holds a CA already: that
/// would cut every existing member off (use [`add_node_certs`]).
pub fn generate_cluster_certs(dir: impl AsRef<Path>, ids: &[u64]) -> Result<(), NetError> {
    let dir = dir.as_ref();
    create_private_dir(dir).map_err(|e| NetError::Tls(format!("{}: {e}", dir.display())))?;
    for name in ["ca.pem", "ca.key"] {
        if dir.join(name).exists() {
            return Err(NetError::Tls(format!(
                "{} holds a CA already; sign new members' certificates with it (raft-kv certs --add), or use another directory",
                dir.display()
            )));
        }
    }
    let ca = ClusterCa::generate()?;
    write_new(dir, "ca.key", &ca.key_pem(), true)?;
    write_new(dir, "ca.pem", &ca.cert_pem(), false)?;
    issue_into(&ca, dir, ids)
}

/// Signs certificates for new members `ids` with the CA kept in `dir`
/// (`ca.key`), next to the existing ones; refuses ids that have one.
pub fn add_node_certs(dir: impl AsRef<Path>, ids: &[u64]) -> Result<(), NetError> {
    let dir = dir.as_ref();
    let key_path = dir.join("ca.key");
    let key = std::fs::read_to_string(&key_path).map_err(|e| {
        NetError::Tls(format!(
            "{}: {e} (the CA's key is needed to sign new members; directories made before it was kept cannot add members)",
            key_path.display()
        ))
    })?;
    let ca = ClusterCa::from_key_pem(&key)?;
    let on_disk = std::fs::read_to_string(dir.join("ca.pem"))
        .map_err(|e| NetError::Tls(format!("{}: {e}", dir.join("ca.pem").display())))?;
    // The key must be one that `ca.pem` certifies (it may hold several
    // CAs while they are rotated): a certificate holds its public key's
    // encoding verbatim.
    let on_disk = CertificateDer::pem_slice_iter(on_disk.as_bytes())
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| NetError::Tls(format!("{}: {e}", dir.join("ca.pem").display())))?;
    let public = ca.key.public_key_der();
    if !on_disk.iter().any(|c| {
        c.as_ref()
            .windows(public.len())
            .any(|w| w == public.as_slice())
    }) {
        return Err(NetError::Tls(format!(
            "{} does not belong to {}",
            key_path.display(),
            dir.join("ca.pem").display()
        )));
    }
    for &id in ids {
        if dir.join(format!("node-{id}.pem")).exists() {
            return Err(NetError::Tls(format!(
                "node {id} has a certificate in {} already",
                dir.display()
            )));
        }
    }
    issue_into(&ca, dir, ids)
}

fn issue_into(ca: &ClusterCa, dir: &Path, ids: &[u64]) -> Result<(), NetError> {
    for &id in ids {
        let (cert, key) = ca.issue(id)?;
        write_new(dir, &format!("node-{id}.key"), &key, true)?;
        write_new(dir, &format!("node-{id}.pem"), &cert, false)?;
    }
    Ok(())
}

/// Creates `dir` and its missing parents; the directories it creates are
/// readable by the owner only (0700).
pub fn create_private_dir(dir: &Path) -> std::io::Result<()> {
    let mut b = std::fs::DirBuilder::new();
    b.recursive(true);
    #[cfg(unix)]
    {
        use std::os::unix::fs::DirBuilderExt;
        b.mode(0o700);
    }
    b.create(dir)
}

/// Creates `dir/name` (never overwriting); a private file is created with
/// mode 0600, so it is never readable by others, not even for a moment.
fn write_new(dir: &Path, name: &str, data: &str, private: bool) -> Result<(), NetError> {
    use std::io::Write;
    let p = dir.join(name);
    let err = |e: std::io::Error| NetError::Tls(format!("{}: {e}", p.display()));
    let mut opts = std::fs::OpenOptions::new();
    opts.write(true).create_new(true);
    #[cfg(unix)]
    {
        use std::os::unix::fs::OpenOptionsExt;
        opts.mode(if private { 0o600 } else { 0o644 });
    }
    #[cfg(not(unix))]
    let _ = private;
    let mut f = opts.open(&p).map_err(err)?;
    f.write_all(data.as_bytes()).map_err(err)?;
    f.sync_all().map_err(err)
}

fn provider() -> Arc<rustls::crypto::CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

fn roots(m: &TlsMaterial) -> Result<Arc<RootCertStore>, NetError> {
    let mut roots = RootCertStore::empty();
    for ca in &m.cas {
        roots
            .add(ca.clone())
            .map_err(|e| NetError::Tls(format!("bad CA certificate: {e}")))?;
    }
    Ok(Arc::new(roots))
}

fn tls_err(e: impl std::fmt::Display) -> NetError {
    NetError::Tls(e.to_string())
}

/// The server side: TLS 1.3, a client certificate from the cluster CA required.
pub fn server_config(m: &TlsMaterial) -> Result<quinn::ServerConfig, NetError> {
    let verifier =
        rustls::server::WebPkiClientVerifier::builder_with_provider(roots(m)?, provider())
            .build()
            .map_err(tls_err)?;
    let mut cfg = rustls::ServerConfig::builder_with_provider(provider())
        .with_protocol_versions(&[&rustls::version::TLS13])
        .map_err(tls_err)?
        .with_client_cert_verifier(verifier)
        .with_single_cert(m.chain.clone(), m.key.clone_key())
        .map_err(tls_err)?;
    cfg.alpn_protocols = vec![ALPN.to_vec()];
    let crypto = quinn::crypto::rustls::QuicServerConfig::try_from(cfg).map_err(tls_err)?;
    let mut sc = quinn::ServerConfig::with_crypto(Arc::new(crypto));
    sc.transport_config(Arc::new(transport_config()));
    // Handshakes waiting at once, and what they may buffer: a cluster has
    // a handful of members; a flood of strangers is cut off here.
    sc.max_incoming(MAX_INCOMING);
    sc.incoming_buffer_size(64 * 1024);
    sc.incoming_buffer_size_total(4 << 20);
    Ok(sc)
}

/// The client side: the server must present a cluster certificate for the
/// node we dial; we present ours.
pub fn client_config(m: &TlsMaterial) -> Result<quinn::ClientConfig, NetError> {
    let mut cfg = rustls::ClientConfig::builder_with_provider(provider())
        .with_protocol_versions(&[&rustls::version::TLS13])
        .map_err(tls_err)?
        .with_root_certificates(roots(m)?)
        .with_client_auth_cert(m.chain.clone(), m.key.clone_key())
        .map_err(tls_err)?;
    cfg.alpn_protocols = vec![ALPN.to_vec()];
    let crypto = quinn::crypto::rustls::QuicClientConfig::try_from(cfg).map_err(tls_err)?;
    let mut cc = quinn::ClientConfig::new(Arc::new(crypto));
    cc.transport_config(Arc::new(transport_config()));
    Ok(cc)
}

fn transport_config() -> quinn::TransportConfig {
    let mut t = quinn::TransportConfig::default();
    t.keep_alive_interval(Some(std::time::Duration::from_millis(500)));
    if let Ok(idle) = quinn::IdleTimeout::try_from(std::time::Duration::from_secs(5)) {
        t.max_idle_timeout(Some(idle));
    }
    // Explicit limits, whatever quinn's defaults become: a peer uses three
    // long-lived unidirectional streams (control, bulk, snapshot; a few more
    // while reconnecting) and one bidirectional stream per request.
    t.max_concurrent_uni_streams(quinn::VarInt::from_u32(MAX_UNI_STREAMS));
    t.max_concurrent_bidi_streams(quinn::VarInt::from_u32(MAX_BIDI_STREAMS));
    // Bytes a peer may have in flight: per stream, and per connection.
    t.stream_receive_window(quinn::VarInt::from_u32(STREAM_WINDOW));
    t.receive_window(quinn::VarInt::from_u32(CONNECTION_WINDOW));
    t.send_window(u64::from(CONNECTION_WINDOW));
    // Each node sends on the connection it dialled, so a connection carries
    // data one way and only acknowledgements the other: a peer that
    // acknowledged every second packet sent an ACK-only datagram for about
    // every second append or answer. Asking for one after every
    // ACK_THRESHOLD + 1 packets (or the peer's ack delay) took one client's
    // write from 6.1 datagrams to 4.6 (4.15 Raft messages).
    let mut acks = quinn::AckFrequencyConfig::default();
    acks.ack_eliciting_threshold(quinn::VarInt::from_u32(ACK_THRESHOLD));
    t.ack_frequency_config(Some(acks));
    t
}

/// Packets a peer may receive before it must acknowledge them at once.
/// Seven full packets (about 10 KB) stay below quinn's initial congestion
/// window (12,000 bytes), so a sender never waits for an acknowledgement
/// the peer is holding back.
pub const ACK_THRESHOLD: u32 = 6;

/// Connection attempts being handled at once.
pub const MAX_INCOMING: usize = 64;
/// Unidirectional streams a peer may have open on one connection.
pub const MAX_UNI_STREAMS: u32 = 16;
/// Requests (bidirectional streams) a peer may have open on one connection.
pub const MAX_BIDI_STREAMS: u32 = 64;
/// Unread bytes a peer may send on one stream.
pub const STREAM_WINDOW: u32 = 8 << 20;
/// Unread bytes a peer may send on one connection, all streams together.
pub const CONNECTION_WINDOW: u32 = 32 << 20;

/// True when the connection's client certificate names node `id`. The chain
/// itself was already verified against the cluster CA during the handshake.
pub fn peer_is(conn: &quinn::Connection, id: u64) -> bool {
    let Some(identity) = conn.peer_identity() else {
        return false;
    };
    let Ok(certs) = identity.downcast::<Vec<CertificateDer<'static>>>() else {
        return false;
    };
    let Some(leaf) = certs.first() else {
        return false;
    };
    let Ok(cert) = webpki::EndEntityCert::try_from(leaf) else {
        return false;
    };
    let Ok(name) = ServerName::try_from(node_name(id)) else {
        return false;
    };
    cert.verify_is_valid_for_subject_name(&name).is_ok()
}
