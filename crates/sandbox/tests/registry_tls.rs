//! The Docker backend against real TLS servers:
//!
//! * **Registry pulls**: the distribution registry (v2; Debian's `docker-registry`) serving
//!   HTTPS with a certificate of a CA made here; an image is pushed to it and the backend's
//!   pull policy decides what a workspace starts from: `never` refuses an absent image,
//!   `if-not-present` pulls it once and then keeps the local one, `always` pulls the tag's
//!   newest digest. The digest recorded is the registry's (`repo@sha256:…`).
//! * **Engine API over TLS with client certificates**: the Engine behind a TLS terminator that
//!   demands a client certificate signed by the same CA (what `dockerd --tlsverify` does), so
//!   the backend's `tcp://` + `tls` connection is the one under test; a client certificate of
//!   another CA, a server the CA did not sign, and plain HTTP are refused.
//!
//! Needs the Docker Engine, `docker-registry` and `openssl` (`make test-deps`); skipped loudly
//! without them, required under `CI=true`.

use std::path::{Path, PathBuf};
use std::process::{Child, Command};
use std::sync::Arc;
use std::time::Duration;

use davinci_sandbox::{
    DockerConfig, DockerSandbox, DockerTls, PullPolicy, RunSpec, Sandbox, WorkspaceSpec, testing,
};
use tokio::net::{TcpListener, UnixStream};

fn openssl(dir: &Path, args: &[&str]) {
    let out = Command::new("openssl")
        .args(args)
        .current_dir(dir)
        .output()
        .expect("openssl");
    assert!(
        out.status.success(),
        "openssl {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// A CA and certificates it signed: `server` for 127.0.0.1, `client` for client auth; `rogue`
/// is a self-signed pair of another CA.
struct Pki {
    dir: tempfile::TempDir,
}

impl Pki {
    fn new() -> Pki {
        let dir = tempfile::tempdir().unwrap();
        let d = dir.path();
        let ec = [
            "-newkey",
            "ec",
            "-pkeyopt",
            "ec_paramgen_curve:prime256v1",
            "-nodes",
        ];
        let ca = [
            &["req", "-x509"][..],
            &ec,
            &["-keyout", "ca-key.pem", "-out", "ca.pem", "-days", "2"],
            &["-subj", "/CN=davinci test CA"],
        ]
        .concat();
        openssl(d, &ca);
        for (name, ext) in [
            (
                "server",
                "subjectAltName=IP:127.0.0.1\nextendedKeyUsage=serverAuth\n",
            ),
            ("client", "extendedKeyUsage=clientAuth\n"),
        ] {
            std::fs::write(d.join(format!("{name}.ext")), ext).unwrap();
            let key = format!("{name}-key.pem");
            let csr = format!("{name}.csr");
            let subj = format!("/CN={name}");
            let req = [
                &["req"][..],
                &ec,
                &["-keyout", &key, "-out", &csr, "-subj", &subj],
            ]
            .concat();
            openssl(d, &req);
            openssl(
                d,
                &[
                    "x509",
                    "-req",
                    "-in",
                    &csr,
                    "-CA",
                    "ca.pem",
                    "-CAkey",
                    "ca-key.pem",
                    "-CAcreateserial",
                    "-days",
                    "2",
                    "-extfile",
                    &format!("{name}.ext"),
                    "-out",
                    &format!("{name}.pem"),
                ],
            );
        }
        let rogue = [
            &["req", "-x509"][..],
            &ec,
            &[
                "-keyout",
                "rogue-key.pem",
                "-out",
                "rogue.pem",
                "-days",
                "2",
            ],
            &[
                "-subj",
                "/CN=rogue",
                "-addext",
                "subjectAltName=IP:127.0.0.1",
            ],
        ]
        .concat();
        openssl(d, &rogue);
        Pki { dir }
    }

    fn path(&self, name: &str) -> PathBuf {
        self.dir.path().join(name)
    }

    fn tls(&self, ca: &str, client: &str) -> DockerTls {
        DockerTls {
            ca: self.path(&format!("{ca}.pem")),
            cert: self.path(&format!("{client}.pem")),
            key: self.path(&format!("{client}-key.pem")),
        }
    }
}

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// What the test needs before it can run, or why not.
async fn prerequisites() -> Option<DockerSandbox> {
    for tool in ["docker-registry", "openssl"] {
        if Command::new("sh")
            .args(["-c", &format!("command -v {tool}")])
            .output()
            .map(|o| !o.status.success())
            .unwrap_or(true)
        {
            testing::skip(
                "registry / TLS tests",
                &format!("`{tool}` is not installed (make test-deps)"),
            );
            return None;
        }
    }
    let cfg = DockerConfig {
        owner: format!("registry-test-{}", std::process::id()),
        pull_policy: PullPolicy::Never,
        ..Default::default()
    };
    testing::docker_or_skip("registry / TLS tests", cfg).await
}

/// The distribution registry on a free loopback port, HTTPS with the test CA's certificate.
struct Registry {
    child: Child,
    port: u16,
    _data: tempfile::TempDir,
}

impl Drop for Registry {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

async fn registry(pki: &Pki) -> Registry {
    let data = tempfile::tempdir().unwrap();
    let port = free_port();
    let cfg = data.path().join("config.yml");
    std::fs::write(
        &cfg,
        format!(
            "version: 0.1\nlog:\n  level: warn\nstorage:\n  filesystem:\n    rootdirectory: {}\nhttp:\n  addr: 127.0.0.1:{port}\n  tls:\n    certificate: {}\n    key: {}\n",
            data.path().join("store").display(),
            pki.path("server.pem").display(),
            pki.path("server-key.pem").display(),
        ),
    )
    .unwrap();
    let log = std::fs::File::create(data.path().join("registry.log")).unwrap();
    let child = Command::new("docker-registry")
        .args(["serve", cfg.to_str().unwrap()])
        .stdout(log.try_clone().unwrap())
        .stderr(log)
        .spawn()
        .expect("docker-registry");
    // Killed and waited for on drop, a failed start included.
    let reg = Registry {
        child,
        port,
        _data: data,
    };
    for _ in 0..100 {
        if tokio::net::TcpStream::connect(("127.0.0.1", port))
            .await
            .is_ok()
        {
            return reg;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    panic!(
        "docker-registry did not listen: {}",
        std::fs::read_to_string(reg._data.path().join("registry.log")).unwrap_or_default()
    );
}

/// Pushes local image `id` as `name:tag`; returns the registry's digest (`name@sha256:…`).
async fn push(d: &bollard::Docker, id: &str, name: &str, tag: &str) -> String {
    use futures::StreamExt;
    d.tag_image(
        id,
        Some(
            bollard::query_parameters::TagImageOptionsBuilder::default()
                .repo(name)
                .tag(tag)
                .build(),
        ),
    )
    .await
    .unwrap();
    let mut s = d.push_image(
        name,
        Some(
            bollard::query_parameters::PushImageOptionsBuilder::default()
                .tag(tag)
                .build(),
        ),
        None,
    );
    let mut digest = None;
    while let Some(m) = s.next().await {
        let m = m.expect("push");
        if let Some(e) = m.error_detail {
            panic!("push {name}:{tag}: {e:?}");
        }
        // The engine reports `TAG: digest: sha256:… size: N` once the manifest is up.
        if let Some(st) = m.status
            && let Some(rest) = st.split("digest: ").nth(1)
        {
            digest = rest.split_whitespace().next().map(str::to_string);
        }
    }
    format!("{name}@{}", digest.expect("the push reported a digest"))
}

async fn untag(d: &bollard::Docker, reference: &str) {
    let _ = d
        .remove_image(
            reference,
            Some(
                bollard::query_parameters::RemoveImageOptionsBuilder::default()
                    .noprune(true)
                    .build(),
            ),
            None,
        )
        .await;
}

/// The image id (`sha256:…`) a reference names on the engine.
async fn image_id(d: &bollard::Docker, reference: &str) -> String {
    d.inspect_image(reference).await.unwrap().id.unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pull_policy_against_a_tls_registry() {
    let Some(local) = prerequisites().await else {
        return;
    };
    let pki = Pki::new();
    let reg = registry(&pki).await;
    let d = local.client().clone();
    let base = testing::base_image().unwrap();
    let name = format!("127.0.0.1:{}/davinci-test/sbx", reg.port);
    let image = format!("{name}:v1");
    // Two images of our own (the shared base image keeps no digest of this registry): the
    // base plus a different file each.
    let mut baked = Vec::new();
    for which in ["first", "second"] {
        let tree = tempfile::tempdir().unwrap();
        std::fs::write(tree.path().join("marker.txt"), format!("{which}\n")).unwrap();
        let tag = format!(
            "davinci-test/sbx-{which}:{}-{}",
            std::process::id(),
            reg.port
        );
        baked.push(
            local
                .bake_image(&base, tree.path(), &tag)
                .await
                .unwrap()
                .name,
        );
    }
    let (first_id, second_id) = (image_id(&d, &baked[0]).await, image_id(&d, &baked[1]).await);

    let d1 = push(&d, &first_id, &name, "v1").await;
    untag(&d, &image).await;
    let sandbox = |policy: PullPolicy| {
        let cfg = DockerConfig {
            pull_policy: policy,
            default_image: Some(image.clone()),
            ..local.config().clone()
        };
        async move { DockerSandbox::connect(cfg).await.unwrap() }
    };

    // never: an image the engine lacks is refused, nothing pulled.
    let e = sandbox(PullPolicy::Never)
        .await
        .prepare(&WorkspaceSpec::default())
        .await
        .unwrap_err();
    assert!(e.to_string().contains("pull_policy is `never`"), "{e}");
    assert!(d.inspect_image(&image).await.is_err());

    // if-not-present: pulled over TLS, the registry's digest recorded.
    let sb = sandbox(PullPolicy::IfNotPresent).await;
    let ws = sb.prepare(&WorkspaceSpec::default()).await.unwrap();
    assert_eq!(ws.image.as_ref().unwrap().digest, d1);
    assert_eq!(sb.read_file(&ws, "marker.txt").await.unwrap(), b"first\n");
    sb.release(ws).await.unwrap();

    // The registry's v1 moves to the second image; the engine keeps the first under v1.
    let d2 = push(&d, &second_id, &name, "v1").await;
    assert_ne!(d1, d2);
    d.tag_image(
        &first_id,
        Some(
            bollard::query_parameters::TagImageOptionsBuilder::default()
                .repo(&name)
                .tag("v1")
                .build(),
        ),
    )
    .await
    .unwrap();
    // if-not-present keeps what the engine has...
    let ws = sb.prepare(&WorkspaceSpec::default()).await.unwrap();
    assert_eq!(image_id(&d, &image).await, first_id);
    sb.release(ws).await.unwrap();
    // ...always pulls the tag's newest digest.
    let sb = sandbox(PullPolicy::Always).await;
    let ws = sb.prepare(&WorkspaceSpec::default()).await.unwrap();
    assert_eq!(ws.image.as_ref().unwrap().digest, d2);
    assert_eq!(
        sb.read_file(&ws, "marker.txt").await.unwrap(),
        b"second\n",
        "the workspace is the pulled image's tree"
    );
    sb.release(ws).await.unwrap();
    for id in [&first_id, &second_id] {
        let _ = d
            .remove_image(
                id,
                Some(
                    bollard::query_parameters::RemoveImageOptionsBuilder::default()
                        .force(true)
                        .build(),
                ),
                None,
            )
            .await;
    }
}

/// A TLS terminator in front of the Engine's unix socket that demands a client certificate
/// signed by the CA; returns its port.
async fn tls_engine(pki: &Pki) -> (u16, tokio::task::JoinHandle<()>) {
    use rustls::pki_types::pem::PemObject;
    use rustls::pki_types::{CertificateDer, PrivateKeyDer};
    let _ = rustls::crypto::aws_lc_rs::default_provider().install_default();
    let mut roots = rustls::RootCertStore::empty();
    roots
        .add(CertificateDer::from_pem_file(pki.path("ca.pem")).unwrap())
        .unwrap();
    let verifier = rustls::server::WebPkiClientVerifier::builder(Arc::new(roots))
        .build()
        .unwrap();
    let cfg = rustls::ServerConfig::builder()
        .with_client_cert_verifier(verifier)
        .with_single_cert(
            vec![CertificateDer::from_pem_file(pki.path("server.pem")).unwrap()],
            PrivateKeyDer::from_pem_file(pki.path("server-key.pem")).unwrap(),
        )
        .unwrap();
    let acceptor = tokio_rustls::TlsAcceptor::from(Arc::new(cfg));
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let port = listener.local_addr().unwrap().port();
    let socket = std::env::var("DOCKER_HOST")
        .ok()
        .and_then(|h| h.strip_prefix("unix://").map(str::to_string))
        .unwrap_or_else(|| "/var/run/docker.sock".into());
    let task = tokio::spawn(async move {
        loop {
            let Ok((tcp, _)) = listener.accept().await else {
                return;
            };
            let (acceptor, socket) = (acceptor.clone(), socket.clone());
            tokio::spawn(async move {
                // A refused handshake simply ends the connection, as dockerd does.
                let Ok(mut tls) = acceptor.accept(tcp).await else {
                    return;
                };
                let Ok(mut engine) = UnixStream::connect(&socket).await else {
                    return;
                };
                let _ = tokio::io::copy_bidirectional(&mut tls, &mut engine).await;
            });
        }
    });
    (port, task)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn engine_api_over_tls_with_client_certificates() {
    let Some(local) = prerequisites().await else {
        return;
    };
    let pki = Pki::new();
    let (port, proxy) = tls_engine(&pki).await;
    let endpoint = format!("tcp://127.0.0.1:{port}");
    let cfg = |tls: Option<DockerTls>, endpoint: &str| DockerConfig {
        endpoint: Some(endpoint.to_string()),
        tls,
        api_timeout_s: 20,
        ..local.config().clone()
    };
    let sb = DockerSandbox::connect(cfg(Some(pki.tls("ca", "client")), &endpoint))
        .await
        .unwrap();
    let ws = sb.prepare(&WorkspaceSpec::default()).await.unwrap();
    let o = sb
        .run(&ws, &RunSpec::shell("echo over-tls"), &Default::default())
        .await
        .unwrap();
    assert_eq!(o.stdout_str(), "over-tls\n", "{o:?}");
    sb.write_file(&ws, "f.txt", b"round trip").await.unwrap();
    assert_eq!(sb.read_file(&ws, "f.txt").await.unwrap(), b"round trip");
    sb.release(ws).await.unwrap();

    // A client certificate of another CA, a CA that did not sign the server, plain HTTP.
    for (tls, ep, why) in [
        (
            Some(pki.tls("ca", "rogue")),
            endpoint.clone(),
            "foreign client cert",
        ),
        (
            Some(pki.tls("rogue", "client")),
            endpoint.clone(),
            "untrusted server",
        ),
        (None, format!("http://127.0.0.1:{port}"), "no TLS"),
    ] {
        let e = DockerSandbox::connect(cfg(tls, &ep)).await.unwrap_err();
        assert!(
            e.to_string().contains(&format!("127.0.0.1:{port}")),
            "{why}: {e}"
        );
    }
    proxy.abort();
}
