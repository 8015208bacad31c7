//! Image names of published task sets, used as the instances give them.
//!
//! * SWE-bench (official harness, `swebench/harness/test_spec`): the instance image is
//!   `{namespace}/sweb.eval.{arch}.{instance_id.lower()}:{tag}` with every `__` of that key
//!   replaced by `_1776_` (Docker Hub repository names cannot hold `__`), e.g.
//!   `django__django-11099` → `swebench/sweb.eval.x86_64.django_1776_django-11099:latest`.
//! * SWE-rebench rows carry their image name (`docker_image` / `image_name`, e.g.
//!   `swerebench/sweb.eval.x86_64.0b01001001_1776_spectree-64`); it is used verbatim.

/// The SWE-bench instance image on Docker Hub's `swebench` namespace, x86_64, `latest`.
pub fn swebench_eval_image(instance_id: &str) -> String {
    swebench_eval_image_with(instance_id, "swebench", "x86_64", "latest")
}

/// The SWE-bench instance image for a given namespace, architecture and tag.
pub fn swebench_eval_image_with(
    instance_id: &str,
    namespace: &str,
    arch: &str,
    tag: &str,
) -> String {
    format!(
        "{namespace}/sweb.eval.{arch}.{}:{tag}",
        instance_id.to_lowercase()
    )
    .replace("__", "_1776_")
}

/// The repository of a reference without its tag or digest, as the engine lists it in
/// `RepoDigests` when the reference uses the familiar form (`ubuntu`, `swebench/…`,
/// `HOST:PORT/…`).
pub fn repository(image: &str) -> &str {
    let name = image.split_once('@').map_or(image, |(n, _)| n);
    // A `:` after the last `/` starts the tag (one before it is a registry port).
    match name.rfind(':') {
        Some(i) if !name[i..].contains('/') => &name[..i],
        _ => name,
    }
}

/// Checks that an image reference can be handed to an engine as given: non-empty, at most
/// 255 characters, no whitespace or control characters, not starting with `-`. The engine
/// reports anything subtler (an unknown repository, a bad tag) with the name.
pub fn check_reference(image: &str) -> Result<(), String> {
    if image.is_empty() {
        return Err("empty image name".into());
    }
    if image.len() > 255 {
        return Err(format!(
            "image name of {} characters (at most 255)",
            image.len()
        ));
    }
    if image.starts_with('-') || image.chars().any(|c| c.is_whitespace() || c.is_control()) {
        return Err(format!("`{image}` is not an image reference"));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn swebench_names_follow_the_official_harness() {
        assert_eq!(
            swebench_eval_image("django__django-11099"),
            "swebench/sweb.eval.x86_64.django_1776_django-11099:latest"
        );
        assert_eq!(
            swebench_eval_image("SWE-Gym__Project-1"),
            "swebench/sweb.eval.x86_64.swe-gym_1776_project-1:latest"
        );
        assert_eq!(
            swebench_eval_image_with("astropy__astropy-12907", "myreg.io/sweb", "arm64", "v2"),
            "myreg.io/sweb/sweb.eval.arm64.astropy_1776_astropy-12907:v2"
        );
        assert!(check_reference("swerebench/sweb.eval.x86_64.0b01001001_1776_spectree-64").is_ok());
        assert_eq!(repository("127.0.0.1:5000/a/b:v1"), "127.0.0.1:5000/a/b");
        assert_eq!(repository("127.0.0.1:5000/a/b"), "127.0.0.1:5000/a/b");
        assert_eq!(repository("swebench/x@sha256:00"), "swebench/x");
        assert_eq!(repository("ubuntu:22.04"), "ubuntu");
        assert!(check_reference("bad name").is_err());
        assert!(check_reference("").is_err());
        assert!(check_reference("-x").is_err());
    }
}
