//! The Kubernetes backend's manifests (a sandbox Pod with every option set, the deny-all
//! NetworkPolicy) validate against the Kubernetes schema with `kubernetes-validate` (PyPI,
//! installed into the repository's `.venv` by `make test-deps`; `KUBERNETES_VALIDATE` names
//! another binary). Without it the check is skipped loudly, and under `CI=true` it fails.

use std::collections::BTreeMap;
use std::path::PathBuf;

use davinci_sandbox::{KubernetesConfig, kube, testing};
use k8s_openapi::api::core::v1::Toleration;

fn validator() -> Option<PathBuf> {
    if let Ok(p) = std::env::var("KUBERNETES_VALIDATE") {
        return Some(PathBuf::from(p));
    }
    let venv = PathBuf::from(concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/../../.venv/bin/kubernetes-validate"
    ));
    venv.exists().then_some(venv)
}

fn full_config() -> KubernetesConfig {
    KubernetesConfig {
        namespace: "sandboxes".into(),
        runtime_class: Some("gvisor".into()),
        node_selector: BTreeMap::from([("davinci.dev/pool".into(), "sandbox".into())]),
        tolerations: vec![Toleration {
            key: Some("davinci.dev/sandbox".into()),
            operator: Some("Exists".into()),
            effect: Some("NoSchedule".into()),
            ..Default::default()
        }],
        cpu: Some("2".into()),
        memory: Some("4Gi".into()),
        lease_s: 300,
        max_lifetime_s: 7200,
        ..Default::default()
    }
}

#[test]
fn pod_and_network_policy_are_valid_kubernetes() {
    let cfg = full_config();
    let pod = kube::pod_manifest(
        &cfg,
        "worker-7",
        "3f2a",
        "davinci-sbx-0123456789ab",
        "swebench/sweb.eval.x86_64.django_1776_django-11099:latest",
        "django__django-11099",
    );
    let v = serde_json::to_value(&pod).unwrap();
    // What the backend promises, checked on the manifest itself.
    let spec = &v["spec"];
    assert_eq!(spec["automountServiceAccountToken"], false);
    assert_eq!(spec["runtimeClassName"], "gvisor");
    assert_eq!(spec["restartPolicy"], "Never");
    // The kubelet ends the pod at its lifetime; the renewed lease label ends it sooner when
    // its owner dies.
    assert_eq!(spec["activeDeadlineSeconds"], 7200);
    let labels = &v["metadata"]["labels"];
    let num = |k: &str| labels[k].as_str().unwrap().parse::<u64>().unwrap();
    assert_eq!(
        num(davinci_sandbox::lease::LIFETIME_EXPIRY) - num(davinci_sandbox::lease::LEASE_EXPIRY),
        7200 - 300
    );
    assert_eq!(spec["nodeSelector"]["davinci.dev/pool"], "sandbox");
    assert_eq!(spec["tolerations"][0]["effect"], "NoSchedule");
    let c = &spec["containers"][0];
    assert_eq!(c["resources"]["limits"]["memory"], "4Gi");
    assert_eq!(c["securityContext"]["capabilities"]["drop"][0], "ALL");
    assert_eq!(c["securityContext"]["allowPrivilegeEscalation"], false);
    assert_eq!(
        v["metadata"]["labels"][davinci_sandbox::lease::OWNER],
        "worker-7"
    );
    assert_eq!(
        v["metadata"]["labels"][davinci_sandbox::lease::TASK],
        "django__django-11099"
    );
    let np = serde_json::to_value(kube::network_policy(&cfg)).unwrap();
    assert_eq!(
        np["spec"]["policyTypes"],
        serde_json::json!(["Egress", "Ingress"])
    );
    assert_eq!(np["spec"]["egress"], serde_json::json!([]));

    let Some(bin) = validator() else {
        testing::skip(
            "kubernetes-validate of sandbox manifests",
            "kubernetes-validate not installed (make test-deps puts it in .venv)",
        );
        return;
    };
    let dir = tempfile::tempdir().unwrap();
    let mut files = Vec::new();
    for (name, obj) in [("pod.json", &v), ("networkpolicy.json", &np)] {
        let p = dir.path().join(name);
        std::fs::write(&p, serde_json::to_vec_pretty(obj).unwrap()).unwrap();
        files.push(p);
    }
    let out = std::process::Command::new(&bin)
        .args(["--strict", "-k", "1.33.0"])
        .args(&files)
        .output()
        .unwrap_or_else(|e| panic!("running {}: {e}", bin.display()));
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(out.status.success(), "{text}");
    assert_eq!(text.matches("INFO").count(), 2, "{text}");

    // The validator does catch a bad pod (so a pass above means something).
    let mut bad = v.clone();
    bad["spec"]["activeDeadlineSeconds"] = serde_json::json!("two hours");
    let p = dir.path().join("bad.json");
    std::fs::write(&p, serde_json::to_vec(&bad).unwrap()).unwrap();
    let out = std::process::Command::new(&bin)
        .args(["--strict", "-k", "1.33.0"])
        .arg(&p)
        .output()
        .unwrap();
    assert!(!out.status.success());
}
