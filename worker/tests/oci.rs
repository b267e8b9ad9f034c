//! Scenarios from an OCI registry and from the JetStream object store, end
//! to end: a real `docker-registry` on loopback, the library push, the API
//! checking references up front, worker processes pulling and deploying.

mod support;

use std::{collections::BTreeMap, path::Path};

use bytes::Bytes;
use cm_core::{
    archive,
    oci::{
        self, Client, ClientConfig, Credentials, OciError, Reference,
        manifest::{self, Descriptor, Manifest},
    },
};
use cm_testkit::registry::{self, Registry};
use reqwest::Method;
use serde_json::{Value, json};
use support::Stack;

fn client_for(registry: &Registry, credentials: Option<Credentials>) -> Client {
    Client::new(ClientConfig {
        insecure_registries: vec![registry.host.clone()],
        credentials,
        ..ClientConfig::default()
    })
}

/// A stack whose API and worker reach `registry` over plain HTTP, with
/// `credentials` when given.
async fn stack_for(registry: &Registry, credentials: Option<(&str, &str)>) -> Stack {
    let mut env = vec![("CM_OCI_INSECURE_REGISTRIES", registry.host.as_str())];
    if let Some((user, password)) = credentials {
        env.push(("CM_OCI_USERNAME", user));
        env.push(("CM_OCI_PASSWORD", password));
    }
    let host = registry.host.clone();
    Stack::start_custom(1, &env, move |api| {
        api.oci.insecure_registries = vec![host];
        api.oci.credentials = credentials.map(|(user, password)| Credentials {
            username: user.into(),
            password: cm_core::Secret::new(password.into()),
        });
    })
    .await
}

/// Creates challenge `id` on `scenario`, then an instance; its body.
async fn deploy(stack: &Stack, id: &str, scenario: &str) -> Value {
    let body = stack
        .call_ok(
            Method::POST,
            "/api/v1/challenge",
            Some(json!({"id": id, "scenario": scenario, "timeout": "600s"})),
        )
        .await;
    assert_eq!(body["scenario"], scenario);
    let (status, instance) = stack
        .call(
            Method::POST,
            "/api/v1/instance",
            Some(json!({"challengeId": id, "sourceId": "team-1"})),
        )
        .await;
    assert_eq!(status, 200, "{instance}\n{}", stack.worker_logs());
    let info = instance["connectionInfo"].as_str().expect("connectionInfo");
    assert!(
        info.starts_with("nc ") && info.ends_with(".ctf.local 1337"),
        "{instance}"
    );
    let (status, got) = stack
        .call(Method::GET, &format!("/api/v1/instance/{id}/team-1"), None)
        .await;
    assert_eq!(status, 200, "{got}");
    assert_eq!(got["connectionInfo"], instance["connectionInfo"]);
    instance
}

/// Asserts a challenge create is refused with 400 saying `why`, and that
/// nothing reached etcd.
async fn refused(stack: &Stack, id: &str, scenario: &str, why: &str) {
    let (status, body) = stack
        .call(
            Method::POST,
            "/api/v1/challenge",
            Some(json!({"id": id, "scenario": scenario})),
        )
        .await;
    assert_eq!(status, 400, "{scenario}: {body}");
    let message = body["message"].as_str().expect("message");
    assert!(
        message.contains(why),
        "{scenario}: {message:?} should say {why:?}"
    );
    assert!(
        stack.store.get_challenge(id).await.expect("etcd").is_none(),
        "{id} must not be stored"
    );
}

/// Pushes a hand-made manifest whose layers are `files` (title, content).
async fn push_raw(
    client: &Client,
    r: &Reference,
    artifact_type: &str,
    files: &[(&str, &[u8])],
) -> String {
    let config = client
        .push_blob(r, manifest::EMPTY_CONFIG, Bytes::from_static(b"{}"))
        .await
        .expect("config blob");
    let mut layers = Vec::new();
    for (title, content) in files {
        let mut layer: Descriptor = client
            .push_blob(
                r,
                manifest::SCENARIO_FILE_MEDIA_TYPE,
                Bytes::copy_from_slice(content),
            )
            .await
            .expect("layer blob");
        layer.annotations = BTreeMap::from([(manifest::TITLE_ANNOTATION.into(), (*title).into())]);
        layers.push(layer);
    }
    let m = Manifest {
        schema_version: 2,
        media_type: Some(manifest::IMAGE_MANIFEST.into()),
        artifact_type: Some(artifact_type.into()),
        config,
        layers,
        annotations: BTreeMap::new(),
    };
    client
        .push_manifest(r, Bytes::from(serde_json::to_vec(&m).expect("json")))
        .await
        .expect("manifest")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pushed_scenario_deploys_and_pulls_verified() {
    let registry = registry::start();
    let client = client_for(&registry, None);
    let r = Reference::parse(&registry.reference("ctf/identity:v1")).expect("reference");
    let digest = oci::push(&client, &cm_testkit::example("identity"), &r)
        .await
        .expect("push");

    // The library pulls back exactly the files pushed, by tag and by digest.
    let dest = tempfile::tempdir().expect("tempdir");
    let pulled = oci::pull(&client, &r, dest.path()).await.expect("pull");
    assert_eq!(pulled.digest, digest);
    let pushed: Vec<String> = archive::list_files(&cm_testkit::example("identity"))
        .expect("list")
        .into_iter()
        .map(|(rel, _)| rel)
        .collect();
    assert_eq!(pulled.files, pushed);
    assert_eq!(
        std::fs::read(dest.path().join("main.go")).expect("main.go"),
        std::fs::read(cm_testkit::example("identity").join("main.go")).expect("source")
    );
    let by_digest = Reference::parse(&format!("{}@{digest}", registry.reference("ctf/identity")))
        .expect("digest reference");
    assert_eq!(
        oci::inspect(&client, &by_digest)
            .await
            .expect("inspect")
            .digest,
        digest
    );

    let stack = stack_for(&registry, None).await;
    deploy(&stack, "by-tag", &r.to_string()).await;
    // Same content by digest (and tag + digest): served from the cache.
    deploy(&stack, "by-digest", &by_digest.to_string()).await;
    deploy(&stack, "by-both", &format!("{r}@{digest}")).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_references_and_artifacts_are_refused_up_front() {
    let registry = registry::start();
    let client = client_for(&registry, None);
    let project: &[u8] = b"name: identity\nruntime: go\n";
    let source =
        |name: &str| std::fs::read(cm_testkit::example("identity").join(name)).expect(name);
    let (main_go, go_mod, go_sum) = (source("main.go"), source("go.mod"), source("go.sum"));

    let good = Reference::parse(&registry.reference("ctf/good:v1")).expect("ref");
    push_raw(
        &client,
        &good,
        manifest::SCENARIO_ARTIFACT_TYPE,
        &[
            ("Pulumi.yaml", project),
            ("main.go", &main_go),
            ("go.mod", &go_mod),
            ("go.sum", &go_sum),
        ],
    )
    .await;
    let wrong_type = Reference::parse(&registry.reference("ctf/image:v1")).expect("ref");
    push_raw(
        &client,
        &wrong_type,
        "application/vnd.example.not-a-scenario",
        &[("Pulumi.yaml", project)],
    )
    .await;
    let no_project = Reference::parse(&registry.reference("ctf/noproject:v1")).expect("ref");
    push_raw(
        &client,
        &no_project,
        manifest::SCENARIO_ARTIFACT_TYPE,
        &[("main.go", &main_go)],
    )
    .await;
    let escaping = Reference::parse(&registry.reference("ctf/escape:v1")).expect("ref");
    push_raw(
        &client,
        &escaping,
        manifest::SCENARIO_ARTIFACT_TYPE,
        &[
            ("Pulumi.yaml", project),
            ("../../etc/cron.d/evil", b"* * * * * root id"),
        ],
    )
    .await;
    // The library refuses them too, before writing anything.
    let dest = tempfile::tempdir().expect("tempdir");
    let err = oci::pull(&client, &escaping, dest.path())
        .await
        .expect_err("escape");
    assert!(matches!(err, OciError::Archive(_)), "{err}");
    assert_eq!(std::fs::read_dir(dest.path()).expect("dir").count(), 0);

    let stack = stack_for(&registry, None).await;
    let closed = {
        let port = cm_testkit::server::free_port();
        format!("127.0.0.1:{port}/ctf/identity:v1")
    };
    let cases = [
        (
            registry.reference("ctf/good:nope"),
            "not found in the registry",
        ),
        (
            registry.reference("ctf/unknown:v1"),
            "not found in the registry",
        ),
        (wrong_type.to_string(), "is not a scenario"),
        (no_project.to_string(), "no Pulumi.yaml"),
        (escaping.to_string(), "it holds '..'"),
        (closed.clone(), "is unreachable"),
        (
            "registry.example/UPPER:v1".into(),
            "not a valid OCI reference",
        ),
        (
            format!("nats-object:sha256:{}", "0".repeat(64)),
            "not in the object store",
        ),
    ];
    for (n, (scenario, why)) in cases.iter().enumerate() {
        refused(&stack, &format!("bad-{n}"), scenario, why).await;
    }
    // An unlisted plain-HTTP registry is reached over HTTPS, and the error says what to do.
    let (status, body) = stack
        .call(
            Method::POST,
            "/api/v1/challenge",
            Some(json!({"id": "https", "scenario": "localhost:1/x:v1"})),
        )
        .await;
    assert_eq!(status, 400, "{body}");
    assert!(
        body["message"]
            .as_str()
            .is_some_and(|m| m.contains("--oci-insecure-registries")),
        "{body}"
    );

    // The NATS front door takes the same path.
    let nats = async_nats::connect(stack.nats.url.as_str())
        .await
        .expect("nats");
    let resp = nats
        .request(
            "cm.api.challenge.create",
            serde_json::to_vec(&json!({"id": "nats-bad", "scenario": wrong_type.to_string()}))
                .expect("json")
                .into(),
        )
        .await
        .expect("request");
    let headers = resp.headers.expect("error headers");
    assert_eq!(
        headers.get("Nats-Service-Error-Code").map(|v| v.as_str()),
        Some("400")
    );
    assert!(
        headers
            .get("Nats-Service-Error")
            .is_some_and(|v| v.as_str().contains("is not a scenario"))
    );
    assert!(
        stack
            .store
            .get_challenge("nats-bad")
            .await
            .expect("etcd")
            .is_none()
    );

    // An update to a bad reference changes nothing; to a good one, it applies.
    deploy(&stack, "kept", &good.to_string()).await;
    let (status, body) = stack
        .call(
            Method::PATCH,
            "/api/v1/challenge/kept",
            Some(json!({"scenario": escaping.to_string()})),
        )
        .await;
    assert_eq!(status, 400, "{body}");
    let stored = stack
        .store
        .get_challenge("kept")
        .await
        .expect("etcd")
        .expect("kept");
    assert_eq!(stored.value.scenario, good.to_string());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn digests_are_verified_and_directory_layers_unpack() {
    let registry = registry::start();
    let client = client_for(&registry, None);
    let project: &[u8] = b"name: x\nruntime: go\n";

    // oras's directory layer: a tar.gz of `web/`, marked to be unpacked.
    let tgz = |entries: &[(&str, &[u8])]| {
        let gz = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::default());
        let mut tar = tar::Builder::new(gz);
        for (name, data) in entries {
            let mut header = tar::Header::new_gnu();
            header.set_size(data.len() as u64);
            header.set_mode(0o644);
            header.as_old_mut().name[..name.len()].copy_from_slice(name.as_bytes());
            header.set_cksum();
            tar.append(&header, *data).expect("append");
        }
        tar.into_inner().expect("tar").finish().expect("gzip")
    };
    let push_with_directory = |repo: &'static str, layer: Vec<u8>| {
        let client = client.clone();
        let r = Reference::parse(&registry.reference(repo)).expect("ref");
        async move {
            let config = client
                .push_blob(&r, manifest::EMPTY_CONFIG, Bytes::from_static(b"{}"))
                .await
                .expect("config");
            let mut file = client
                .push_blob(
                    &r,
                    manifest::SCENARIO_FILE_MEDIA_TYPE,
                    Bytes::from_static(b"name: x\nruntime: go\n"),
                )
                .await
                .expect("file");
            file.annotations =
                BTreeMap::from([(manifest::TITLE_ANNOTATION.into(), "Pulumi.yaml".into())]);
            let mut web = client
                .push_blob(&r, manifest::SCENARIO_FILE_MEDIA_TYPE, Bytes::from(layer))
                .await
                .expect("directory");
            web.annotations = BTreeMap::from([
                (manifest::TITLE_ANNOTATION.into(), "web".into()),
                (manifest::UNPACK_ANNOTATION.into(), "true".into()),
            ]);
            let m = Manifest {
                schema_version: 2,
                media_type: Some(manifest::IMAGE_MANIFEST.into()),
                artifact_type: None,
                // Older oras: the artifact type as the config's media type.
                config: Descriptor {
                    media_type: manifest::SCENARIO_ARTIFACT_TYPE.into(),
                    ..config
                },
                layers: vec![file, web],
                annotations: BTreeMap::new(),
            };
            client
                .push_manifest(&r, Bytes::from(serde_json::to_vec(&m).expect("json")))
                .await
                .expect("manifest");
            r
        }
    };
    let r = push_with_directory("ctf/dir:v1", tgz(&[("web/css/site.css", b"body{}")])).await;
    let dest = tempfile::tempdir().expect("tempdir");
    let pulled = oci::pull(&client, &r, dest.path()).await.expect("pull");
    assert_eq!(pulled.files, ["Pulumi.yaml", "web/css/site.css"]);
    assert_eq!(
        std::fs::read(dest.path().join("web/css/site.css")).expect("css"),
        b"body{}"
    );
    assert_eq!(
        oci::inspect(&client, &r).await.expect("inspect").files,
        pulled.files
    );

    let outside = push_with_directory("ctf/dir-escape:v1", tgz(&[("other/x", b"x")])).await;
    let err = oci::inspect(&client, &outside)
        .await
        .expect_err("outside its directory");
    assert!(
        err.to_string().contains("outside the layer's directory"),
        "{err}"
    );

    // A blob altered in the registry's storage no longer matches its digest.
    let tampered = Reference::parse(&registry.reference("ctf/tampered:v1")).expect("ref");
    push_raw(
        &client,
        &tampered,
        manifest::SCENARIO_ARTIFACT_TYPE,
        &[("Pulumi.yaml", project)],
    )
    .await;
    let (_, m) = client.manifest(&tampered).await.expect("manifest");
    let blob = registry.blob_path(&m.layers[0].digest);
    let mut bytes = std::fs::read(&blob).expect("stored blob");
    bytes[0] ^= 0x20;
    std::fs::write(&blob, bytes).expect("tamper");
    let dest = tempfile::tempdir().expect("tempdir");
    let err = oci::pull(&client, &tampered, dest.path())
        .await
        .expect_err("tampered");
    assert!(matches!(err, OciError::DigestMismatch { .. }), "{err}");
}

/// Builds the identity example into `dir/main` with `go build`.
fn go_build(dir: &Path) {
    let out = std::process::Command::new(cm_testkit::go())
        .args(["build", "-trimpath", "-o"])
        .arg(dir.join("main"))
        .arg(".")
        .current_dir(cm_testkit::example("identity"))
        .env("GOFLAGS", "-mod=mod")
        .env("CGO_ENABLED", "0")
        .output()
        .expect("go build");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn chall_manager_prebuilt_layout_deploys() {
    let registry = registry::start();
    let client = client_for(&registry, None);
    // chall-manager's examples: `oras push --artifact-type
    // application/vnd.ctfer-io.scenario <ref> main:application/vnd.ctfer-io.file
    // Pulumi.yaml:application/vnd.ctfer-io.file`, main built beforehand.
    let dir = tempfile::tempdir().expect("tempdir");
    go_build(dir.path());
    let main = std::fs::read(dir.path().join("main")).expect("main");
    let project = b"name: identity\nruntime:\n  name: go\n  options:\n    binary: ./main\n";
    let r = Reference::parse(&registry.reference("ctfer-io/identity:latest")).expect("ref");
    push_raw(
        &client,
        &r,
        manifest::SCENARIO_ARTIFACT_TYPE,
        &[("main", &main), ("Pulumi.yaml", project)],
    )
    .await;

    let stack = stack_for(&registry, None).await;
    deploy(&stack, "prebuilt", &r.to_string()).await;
    assert!(
        !stack.worker_logs().contains("compiling scenario"),
        "a prebuilt scenario is not compiled:\n{}",
        stack.worker_logs()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn basic_auth_registry() {
    let (user, password) = ("ctf-admin", "registry-s3cret-pw");
    let registry = registry::start_with_user(user, password);
    let r = Reference::parse(&registry.reference("private/identity:v1")).expect("ref");

    let anonymous = client_for(&registry, None);
    let err = oci::push(&anonymous, &cm_testkit::example("identity"), &r)
        .await
        .expect_err("anonymous push");
    assert!(err.to_string().contains("none are configured"), "{err}");
    let wrong = client_for(
        &registry,
        Some(Credentials {
            username: user.into(),
            password: cm_core::Secret::new("wrong".into()),
        }),
    );
    let err = oci::inspect(&wrong, &r).await.expect_err("wrong password");
    assert!(
        err.to_string().contains("credentials were refused"),
        "{err}"
    );

    let authed = client_for(
        &registry,
        Some(Credentials {
            username: user.into(),
            password: cm_core::Secret::new(password.into()),
        }),
    );
    oci::push(&authed, &cm_testkit::example("identity"), &r)
        .await
        .expect("push with credentials");

    let stack = stack_for(&registry, Some((user, password))).await;
    deploy(&stack, "private", &r.to_string()).await;
    assert!(
        !stack.worker_logs().contains(password),
        "the password must never be logged"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn uploaded_scenario_deploys() {
    let stack = Stack::start(1).await;
    let archive = archive::pack_dir(&cm_testkit::example("identity")).expect("pack");
    let upload = |body: Vec<u8>| {
        stack
            .http
            .post(format!("{}/api/v1/scenario", stack.api))
            .header("content-type", "application/gzip")
            .body(body)
            .send()
    };
    let resp = upload(archive.clone()).await.expect("upload");
    assert_eq!(resp.status(), 200);
    let body: Value = resp.json().await.expect("json");
    let reference = body["scenario"].as_str().expect("scenario").to_owned();
    assert!(reference.starts_with("nats-object:sha256:"), "{reference}");
    // Same archive, same reference.
    let again: Value = upload(archive)
        .await
        .expect("upload")
        .json()
        .await
        .expect("json");
    assert_eq!(again["scenario"], reference.as_str());

    deploy(&stack, "uploaded", &reference).await;

    // The NATS front door stores it under the same reference.
    let nats = async_nats::connect(stack.nats.url.as_str())
        .await
        .expect("nats");
    let resp = nats
        .request(
            "cm.api.scenario.upload",
            archive::pack_dir(&cm_testkit::example("identity"))
                .expect("pack")
                .into(),
        )
        .await
        .expect("NATS upload");
    assert!(resp.headers.is_none(), "{:?}", resp.headers);
    let body: Value = serde_json::from_slice(&resp.payload).expect("json");
    assert_eq!(body["scenario"], reference.as_str());

    // An archive escaping its directory, or without Pulumi.yaml, is refused.
    let mut escaping = tar::Builder::new(Vec::new());
    let mut header = tar::Header::new_gnu();
    header.set_size(1);
    header.set_mode(0o644);
    header.as_old_mut().name[..9].copy_from_slice(b"../evil.x");
    header.set_cksum();
    escaping.append(&header, &b"x"[..]).expect("append");
    let resp = upload(escaping.into_inner().expect("tar"))
        .await
        .expect("upload");
    assert_eq!(resp.status(), 400);
    let body: Value = resp.json().await.expect("json");
    assert!(
        body["message"].as_str().is_some_and(|m| m.contains("'..'")),
        "{body}"
    );

    let dir = tempfile::tempdir().expect("tempdir");
    std::fs::write(dir.path().join("main.go"), "package main\n").expect("write");
    let resp = upload(archive::pack_dir(dir.path()).expect("pack"))
        .await
        .expect("upload");
    assert_eq!(resp.status(), 400);
    let body: Value = resp.json().await.expect("json");
    assert!(
        body["message"]
            .as_str()
            .is_some_and(|m| m.contains("no Pulumi.yaml")),
        "{body}"
    );
}
