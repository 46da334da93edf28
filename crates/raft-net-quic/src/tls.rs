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
    /// The cluster CA certificate (DER).
    pub ca: CertificateDer<'static>,
    /// This node's certificate chain (DER), leaf first.
    pub chain: Vec<CertificateDer<'static>>,
    /// This node's private key.
    pub key: PrivateKeyDer<'static>,
}

impl Clone for TlsMaterial {
    fn clone(&self) -> Self {
        TlsMaterial {
            ca: self.ca.clone(),
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
        let ca = CertificateDer::from_pem_slice(&read(ca_name.clone())?)
            .map_err(|e| bad(ca_name, e.to_string()))?;
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
        Ok(TlsMaterial { ca, chain, key })
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

fn gen_err(e: rcgen::Error) -> NetError {
    NetError::Tls(format!("certificate generation failed: {e}"))
}

impl ClusterCa {
    /// A new self-signed CA.
    pub fn generate() -> Result<Self, NetError> {
        let key = rcgen::KeyPair::generate().map_err(gen_err)?;
        let mut params = rcgen::CertificateParams::new(Vec::<String>::new()).map_err(gen_err)?;
        params.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
        params
            .distinguished_name
            .push(rcgen::DnType::CommonName, "raft cluster CA");
        params.key_usages = vec![
            rcgen::KeyUsagePurpose::KeyCertSign,
            rcgen::KeyUsagePurpose::CrlSign,
        ];
        let cert = params.self_signed(&key).map_err(gen_err)?;
        Ok(ClusterCa { cert, key })
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
            ca: CertificateDer::from_pem_slice(self.cert_pem().as_bytes()).map_err(parse)?,
            chain: vec![CertificateDer::from_pem_slice(cert.as_bytes()).map_err(parse)?],
            key: PrivateKeyDer::from_pem_slice(key.as_bytes()).map_err(parse)?,
        })
    }
}

/// Writes a new CA and a certificate per node into `dir`: `ca.pem`,
/// `node-<id>.pem`, `node-<id>.key` (keys readable by the owner only). The
/// CA's private key is not kept: issue all certificates at once.
pub fn generate_cluster_certs(dir: impl AsRef<Path>, ids: &[u64]) -> Result<(), NetError> {
    let dir = dir.as_ref();
    std::fs::create_dir_all(dir).map_err(|e| NetError::Tls(format!("{}: {e}", dir.display())))?;
    let ca = ClusterCa::generate()?;
    let write = |name: String, data: &str, private: bool| -> Result<(), NetError> {
        let p = dir.join(name);
        let err = |e: std::io::Error| NetError::Tls(format!("{}: {e}", p.display()));
        std::fs::write(&p, data).map_err(err)?;
        #[cfg(unix)]
        if private {
            use std::os::unix::fs::PermissionsExt;
            std::fs::set_permissions(&p, std::fs::Permissions::from_mode(0o600)).map_err(err)?;
        }
        #[cfg(not(unix))]
        let _ = private;
        Ok(())
    };
    write("ca.pem".into(), &ca.cert_pem(), false)?;
    for &id in ids {
        let (cert, key) = ca.issue(id)?;
        write(format!("node-{id}.pem"), &cert, false)?;
        write(format!("node-{id}.key"), &key, true)?;
    }
    Ok(())
}

fn provider() -> Arc<rustls::crypto::CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

fn roots(m: &TlsMaterial) -> Result<Arc<RootCertStore>, NetError> {
    let mut roots = RootCertStore::empty();
    roots
        .add(m.ca.clone())
        .map_err(|e| NetError::Tls(format!("bad CA certificate: {e}")))?;
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
    t
}

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
