//! Security: a test CA and server certificate (openssl), Mosquitto with a password file, an
//! ACL and a TLS listener.

use std::path::{Path, PathBuf};
use std::process::Command;

use super::broker::{free_port, Broker};
use super::probe::Probe;

/// PEM files made by `make_tls_files`.
pub struct TlsFiles {
    /// The test CA that signed the server certificate.
    pub ca: PathBuf,
    pub server_cert: PathBuf,
    pub server_key: PathBuf,
    /// A second CA that signed nothing the broker uses: the wrong CA.
    pub other_ca: PathBuf,
}

fn openssl(dir: &Path, args: &[&str]) {
    let out = Command::new("openssl")
        .current_dir(dir)
        .args(args)
        .output()
        .expect("openssl (apt-get install openssl)");
    assert!(
        out.status.success(),
        "openssl {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// A test CA, a server certificate for 127.0.0.1 / localhost signed by it, and an
/// unrelated second CA, all in `dir` (EC P-256, valid two days).
pub fn make_tls_files(dir: &Path) -> TlsFiles {
    use std::os::unix::fs::PermissionsExt;
    std::fs::create_dir_all(dir).unwrap();
    let ec = [
        "-newkey",
        "ec",
        "-pkeyopt",
        "ec_paramgen_curve:prime256v1",
        "-nodes",
    ];
    for (name, cn) in [("ca", "edgeact test CA"), ("other-ca", "unrelated CA")] {
        let mut a = vec!["req", "-x509"];
        a.extend(ec);
        let key = format!("{name}.key");
        let pem = format!("{name}.pem");
        let subj = format!("/CN={cn}");
        a.extend(["-keyout", &key, "-out", &pem, "-days", "2", "-subj", &subj]);
        openssl(dir, &a);
    }
    let mut a = vec!["req"];
    a.extend(ec);
    a.extend([
        "-keyout",
        "server.key",
        "-out",
        "server.csr",
        "-subj",
        "/CN=localhost",
    ]);
    openssl(dir, &a);
    std::fs::write(
        dir.join("server.ext"),
        "subjectAltName=IP:127.0.0.1,DNS:localhost\nbasicConstraints=CA:FALSE\n",
    )
    .unwrap();
    openssl(
        dir,
        &[
            "x509",
            "-req",
            "-in",
            "server.csr",
            "-CA",
            "ca.pem",
            "-CAkey",
            "ca.key",
            "-CAcreateserial",
            "-out",
            "server.pem",
            "-days",
            "2",
            "-extfile",
            "server.ext",
        ],
    );
    // Mosquitto drops to its own user: it must read the key.
    for f in ["ca.pem", "server.pem", "server.key", "other-ca.pem"] {
        std::fs::set_permissions(dir.join(f), std::fs::Permissions::from_mode(0o644)).unwrap();
    }
    TlsFiles {
        ca: dir.join("ca.pem"),
        server_cert: dir.join("server.pem"),
        server_key: dir.join("server.key"),
        other_ca: dir.join("other-ca.pem"),
    }
}

/// Mosquitto that refuses anonymous clients: a password file with `admin` (password
/// `admin-pw`) and one user per device id (password `pw-<id>`), an ACL giving admin every
/// topic and a device only `edgeact/<its user name>/#`; a plain listener (`broker.port`,
/// for the admin probe) and a TLS listener (`tls_port`).
pub struct SecureBroker {
    pub broker: Broker,
    pub tls_port: u16,
    pub tls: TlsFiles,
}

impl SecureBroker {
    pub fn start(dir: &Path, devices: &[&str]) -> SecureBroker {
        use std::os::unix::fs::PermissionsExt;
        let tls = make_tls_files(&dir.join("tls"));
        let passwd = dir.join("passwd");
        let mut users = vec![("admin".to_string(), "admin-pw".to_string())];
        users.extend(devices.iter().map(|d| (d.to_string(), format!("pw-{d}"))));
        for (i, (u, p)) in users.iter().enumerate() {
            let mut c = Command::new("mosquitto_passwd");
            c.arg("-b");
            if i == 0 {
                c.arg("-c");
            }
            let st = c
                .arg(&passwd)
                .arg(u)
                .arg(p)
                .output()
                .expect("mosquitto_passwd");
            assert!(
                st.status.success(),
                "{}",
                String::from_utf8_lossy(&st.stderr)
            );
        }
        let acl = dir.join("acl");
        std::fs::write(
            &acl,
            "pattern readwrite edgeact/%u/#\n\nuser admin\ntopic readwrite #\n",
        )
        .unwrap();
        for f in [&passwd, &acl] {
            std::fs::set_permissions(f, std::fs::Permissions::from_mode(0o644)).unwrap();
        }
        let tls_port = free_port();
        let conf = format!(
            "allow_anonymous false\npassword_file {}\nacl_file {}\nlistener {tls_port} 127.0.0.1\ncafile {}\ncertfile {}\nkeyfile {}\n",
            passwd.display(),
            acl.display(),
            tls.ca.display(),
            tls.server_cert.display(),
            tls.server_key.display(),
        );
        let broker = Broker::start_with(dir, &conf);
        SecureBroker {
            broker,
            tls_port,
            tls,
        }
    }

    pub fn tls_url(&self) -> String {
        format!("mqtts://127.0.0.1:{}", self.tls_port)
    }

    /// A probe on the plain listener as `user` with its password.
    pub fn probe(&self, user: &str, password: &str, id: &str, subs: &[&str]) -> Probe {
        let mut o = Probe::options(self.broker.port, id);
        o.set_credentials(user, password);
        Probe::connect_with(o, subs)
    }

    /// A password file for `device` in `dir`.
    pub fn password_file(&self, dir: &Path, device: &str) -> PathBuf {
        let p = dir.join(format!("{device}.password"));
        std::fs::write(&p, format!("pw-{device}\n")).unwrap();
        private(&p);
        p
    }
}

/// Owner-only permissions, which serve requires of a password file.
pub fn private(p: &Path) {
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(p, std::fs::Permissions::from_mode(0o600)).unwrap();
}
