//! Test certificates, generated per test with rcgen and written as PEM files:
//! a CA, a server certificate for `127.0.0.1`/`localhost`, a client
//! certificate signed by the CA, and a "rogue" client certificate signed by
//! another CA (which the servers must refuse).

use std::path::{Path, PathBuf};

use rcgen::{
    BasicConstraints, CertificateParams, DnType, ExtendedKeyUsagePurpose, IsCa, Issuer, KeyPair,
    KeyUsagePurpose,
};

/// PEM files of a throw-away public key infrastructure.
#[derive(Debug)]
pub struct Pki {
    _dir: tempfile::TempDir,
    /// The CA certificate (trust anchor of servers and clients).
    pub ca: PathBuf,
    /// Server certificate for `127.0.0.1` and `localhost`, and its key.
    pub server_cert: PathBuf,
    pub server_key: PathBuf,
    /// Client certificate (CN `cm-client`) signed by the CA, and its key.
    pub client_cert: PathBuf,
    pub client_key: PathBuf,
    /// Client certificate signed by another CA, and its key.
    pub rogue_cert: PathBuf,
    pub rogue_key: PathBuf,
}

impl Pki {
    /// Generates everything into a new temporary directory.
    pub fn generate() -> Self {
        let dir = tempfile::Builder::new()
            .prefix("cm-pki-")
            .tempdir()
            .unwrap_or_else(|e| panic!("cannot create a temporary directory: {e}"));
        let (ca_pem, ca) = new_ca("cm test CA");
        let (_, rogue_ca) = new_ca("rogue CA");
        let path = |name: &str| dir.path().join(name);
        let write = |name: &str, pem: String| {
            let p = path(name);
            std::fs::write(&p, pem).unwrap_or_else(|e| panic!("writing {}: {e}", p.display()));
            p
        };
        let ca_path = write("ca.pem", ca_pem);
        let (server_cert, server_key) = leaf(
            &ca,
            "127.0.0.1",
            &["127.0.0.1", "localhost"],
            &[
                ExtendedKeyUsagePurpose::ServerAuth,
                ExtendedKeyUsagePurpose::ClientAuth,
            ],
        );
        let (client_cert, client_key) = leaf(
            &ca,
            "cm-client",
            &[],
            &[ExtendedKeyUsagePurpose::ClientAuth],
        );
        let (rogue_cert, rogue_key) = leaf(
            &rogue_ca,
            "cm-client",
            &[],
            &[ExtendedKeyUsagePurpose::ClientAuth],
        );
        Self {
            ca: ca_path,
            server_cert: write("server.pem", server_cert),
            server_key: write("server-key.pem", server_key),
            client_cert: write("client.pem", client_cert),
            client_key: write("client-key.pem", client_key),
            rogue_cert: write("rogue.pem", rogue_cert),
            rogue_key: write("rogue-key.pem", rogue_key),
            _dir: dir,
        }
    }

    /// The directory holding the files (for extra files of a test).
    pub fn dir(&self) -> &Path {
        self._dir.path()
    }
}

fn validity(params: &mut CertificateParams) {
    let now = time::OffsetDateTime::now_utc();
    params.not_before = now - time::Duration::days(1);
    params.not_after = now + time::Duration::days(30);
}

fn new_ca(name: &str) -> (String, Issuer<'static, KeyPair>) {
    let key = KeyPair::generate().unwrap_or_else(|e| panic!("key generation: {e}"));
    let mut params =
        CertificateParams::new(Vec::<String>::new()).unwrap_or_else(|e| panic!("params: {e}"));
    params.distinguished_name.push(DnType::CommonName, name);
    params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    params.key_usages = vec![
        KeyUsagePurpose::KeyCertSign,
        KeyUsagePurpose::CrlSign,
        KeyUsagePurpose::DigitalSignature,
    ];
    validity(&mut params);
    let cert = params
        .self_signed(&key)
        .unwrap_or_else(|e| panic!("self-signing the CA: {e}"));
    (cert.pem(), Issuer::new(params, key))
}

fn leaf(
    issuer: &Issuer<'static, KeyPair>,
    common_name: &str,
    names: &[&str],
    usages: &[ExtendedKeyUsagePurpose],
) -> (String, String) {
    let key = KeyPair::generate().unwrap_or_else(|e| panic!("key generation: {e}"));
    let names: Vec<String> = names.iter().map(|n| (*n).to_owned()).collect();
    let mut params = CertificateParams::new(names).unwrap_or_else(|e| panic!("params: {e}"));
    params
        .distinguished_name
        .push(DnType::CommonName, common_name);
    params.key_usages = vec![
        KeyUsagePurpose::DigitalSignature,
        KeyUsagePurpose::KeyEncipherment,
    ];
    params.extended_key_usages = usages.to_vec();
    validity(&mut params);
    let cert = params
        .signed_by(&key, issuer)
        .unwrap_or_else(|e| panic!("signing {common_name}: {e}"));
    (cert.pem(), key.serialize_pem())
}
