//! Every configuration the repository ships, and the deployment files around them, agree with
//! the code and with each other:
//!
//! - config/default.toml, deploy/**/tlsbridge.toml, the tlsbridge.toml embedded in Kubernetes
//!   ConfigMaps and the ```toml blocks of README.md and docs/*.md load with `Config::load_from`
//!   and pass the real binary's `tlsbridge check` (certificate files need not exist);
//! - the Kubernetes manifests and the compose file publish the ports their config listens on,
//!   probe the admin port their config opens, on paths the admin endpoint serves;
//! - the Dockerfile builds features that Cargo.toml has and exposes the default config's ports;
//! - the systemd unit passes `systemd-analyze verify` (where the command exists) and agrees with
//!   its config.

use std::collections::{BTreeMap, BTreeSet};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use serde::Deserialize;
use serde_norway::Value;
use tlsbridge::config::Config;

const ROOT: &str = env!("CARGO_MANIFEST_DIR");
/// The image's WORKDIR: relative config paths resolve against it in a container.
const IMAGE_WORKDIR: &str = "/var/lib/tlsbridge";
/// The endpoint `tlsbridge health` (the image's HEALTHCHECK) asks.
const HEALTH_PATH: &str = "/healthz";

fn root() -> PathBuf {
    PathBuf::from(ROOT)
}

fn read(path: &Path) -> String {
    std::fs::read_to_string(path).unwrap_or_else(|err| panic!("read {}: {err}", path.display()))
}

fn files_under(dir: &Path, out: &mut Vec<PathBuf>) {
    let Ok(entries) = std::fs::read_dir(dir) else {
        return;
    };
    let mut entries: Vec<PathBuf> = entries.filter_map(|e| e.ok().map(|e| e.path())).collect();
    entries.sort();
    for path in entries {
        if path.is_dir() {
            files_under(&path, out);
        } else {
            out.push(path);
        }
    }
}

fn deploy_files(ext: &str) -> Vec<PathBuf> {
    let mut all = Vec::new();
    files_under(&root().join("deploy"), &mut all);
    all.retain(|p| p.extension().is_some_and(|e| e == ext));
    all
}

/// All documents of a (possibly multi-document) YAML file.
fn yaml_docs(path: &Path) -> Vec<Value> {
    serde_norway::Deserializer::from_str(&read(path))
        .map(|doc| {
            Value::deserialize(doc).unwrap_or_else(|err| panic!("{}: {err}", path.display()))
        })
        .filter(|doc| !doc.is_null())
        .collect()
}

fn str_of(value: &Value) -> &str {
    value.as_str().unwrap_or("")
}

/// A shipped TOML text and where it comes from.
struct Shipped {
    origin: String,
    text: String,
}

/// ConfigMaps' `*.toml` data entries in deploy/**/*.yaml: (ConfigMap name, key, text, origin).
fn configmap_tomls() -> Vec<(String, String, Shipped)> {
    let mut out = Vec::new();
    for path in deploy_files("yaml").into_iter().chain(deploy_files("yml")) {
        for doc in yaml_docs(&path) {
            if str_of(&doc["kind"]) != "ConfigMap" {
                continue;
            }
            let name = str_of(&doc["metadata"]["name"]).to_string();
            let Some(data) = doc["data"].as_mapping() else {
                continue;
            };
            for (key, value) in data {
                let key = str_of(key);
                if key.ends_with(".toml") {
                    out.push((
                        name.clone(),
                        key.to_string(),
                        Shipped {
                            origin: format!("{} (ConfigMap {name}, {key})", path.display()),
                            text: str_of(value).to_string(),
                        },
                    ));
                }
            }
        }
    }
    out
}

/// ```toml blocks of README.md and docs/*.md that are configurations: a top-level key or a
/// table header outside comments (fragments of one table without its header are skipped).
fn markdown_tomls() -> (Vec<Shipped>, Vec<String>) {
    let mut docs = vec![root().join("README.md")];
    files_under(&root().join("docs"), &mut docs);
    docs.retain(|p| p.exists() && p.extension().is_some_and(|e| e == "md"));
    let (mut blocks, mut skipped) = (Vec::new(), Vec::new());
    for path in docs {
        let text = read(&path);
        let mut block: Option<(usize, String)> = None;
        for (n, line) in text.lines().enumerate() {
            let fence = line.trim_start();
            match &mut block {
                None if fence.starts_with("```toml") => block = Some((n + 1, String::new())),
                Some((start, body)) if fence.starts_with("```") => {
                    let origin = format!("{}:{start}", path.display());
                    let first = body
                        .lines()
                        .map(str::trim)
                        .find(|l| !l.is_empty() && !l.starts_with('#'))
                        .unwrap_or("");
                    let complete = first.starts_with('[')
                        || body
                            .lines()
                            .any(|l| l.trim_start().starts_with("state_dir"));
                    if complete {
                        blocks.push(Shipped {
                            origin,
                            text: std::mem::take(body),
                        });
                    } else {
                        skipped.push(origin);
                    }
                    block = None;
                }
                Some((_, body)) => {
                    body.push_str(line);
                    body.push('\n');
                }
                None => {}
            }
        }
    }
    (blocks, skipped)
}

/// Every shipped configuration: the files themselves where they exist, else a copy in `dir`.
fn shipped(dir: &Path) -> Vec<(String, PathBuf)> {
    let mut out = vec![(
        "config/default.toml".to_string(),
        root().join("config/default.toml"),
    )];
    for path in deploy_files("toml") {
        out.push((path.display().to_string(), path));
    }
    let embedded = configmap_tomls().into_iter().map(|(_, _, s)| s);
    for (i, item) in embedded.chain(markdown_tomls().0).enumerate() {
        let path = dir.join(format!("shipped-{i}.toml"));
        std::fs::write(&path, &item.text).unwrap();
        out.push((item.origin, path));
    }
    out
}

fn load(path: &Path, env: &[(&str, &str)]) -> Result<Config, String> {
    let env = env.iter().map(|(k, v)| (k.to_string(), v.to_string()));
    Config::load_from(Some(path), env).map_err(|err| err.to_string())
}

fn load_text(text: &str, env: &[(&str, &str)]) -> Config {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("tlsbridge.toml");
    std::fs::write(&path, text).unwrap();
    load(&path, env).unwrap_or_else(|err| panic!("{err}\n{text}"))
}

/// The real binary, in an empty working directory and without TLSBRIDGE__ variables.
fn tlsbridge(cwd: &Path, args: &[&str], env: &[(&str, &str)]) -> (Option<i32>, String) {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_tlsbridge"));
    cmd.args(args).current_dir(cwd);
    for (key, _) in std::env::vars() {
        if key.starts_with("TLSBRIDGE__") || key == "RUST_LOG" {
            cmd.env_remove(key);
        }
    }
    cmd.envs(env.iter().copied());
    let out = cmd.output().expect("run tlsbridge");
    (
        out.status.code(),
        format!(
            "{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        ),
    )
}

/// `ENV TLSBRIDGE__...=...` lines of the Dockerfile: what the image sets for every command.
fn dockerfile() -> String {
    read(&root().join("Dockerfile"))
}

fn image_env() -> Vec<(String, String)> {
    dockerfile()
        .lines()
        .filter_map(|l| l.trim().strip_prefix("ENV "))
        .flat_map(|rest| rest.split_whitespace())
        .filter_map(|pair| pair.split_once('='))
        .filter(|(k, _)| k.starts_with("TLSBRIDGE__"))
        .map(|(k, v)| (k.to_string(), v.trim_matches('"').to_string()))
        .collect()
}

fn image_env_refs(env: &[(String, String)]) -> Vec<(&str, &str)> {
    env.iter().map(|(k, v)| (k.as_str(), v.as_str())).collect()
}

/// The instruction's arguments, continuation lines joined.
fn dockerfile_instruction(name: &str) -> Vec<String> {
    let joined = dockerfile().replace("\\\n", " ");
    joined
        .lines()
        .filter(|l| !l.trim_start().starts_with('#'))
        .filter_map(|l| l.trim().strip_prefix(&format!("{name} ")))
        .map(|rest| rest.trim().to_string())
        .collect()
}

fn is_loopback(addr: &SocketAddr) -> bool {
    addr.ip().is_loopback()
}

fn resolve_in_image(path: &Path) -> PathBuf {
    if path.is_absolute() {
        path.to_path_buf()
    } else {
        Path::new(IMAGE_WORKDIR).join(path)
    }
}

fn parse_duration(text: &str) -> Duration {
    humantime::parse_duration(text.trim()).unwrap_or_else(|err| panic!("{text:?}: {err}"))
}

#[test]
fn every_shipped_config_loads() {
    let dir = tempfile::tempdir().unwrap();
    let all = shipped(dir.path());
    let (_, skipped) = markdown_tomls();
    eprintln!("markdown toml blocks skipped as fragments: {skipped:?}");
    // default.toml, compose and systemd files, two ConfigMaps, the docs' relay route at least.
    assert!(all.len() >= 6, "found only {:?}", all);
    let mut failures = Vec::new();
    for (origin, path) in &all {
        match load(path, &[]) {
            Ok(config) => eprintln!("ok: {origin}: {} route(s)", config.routes.len()),
            Err(err) => failures.push(format!("{origin}: {err}")),
        }
    }
    assert!(failures.is_empty(), "{}", failures.join("\n"));
}

#[test]
fn every_shipped_config_passes_check() {
    let dir = tempfile::tempdir().unwrap();
    let all = shipped(dir.path());
    let cwd = tempfile::tempdir().unwrap();
    let mut failures = Vec::new();
    let (code, out) = tlsbridge(cwd.path(), &["check"], &[]);
    if code != Some(0) {
        failures.push(format!("embedded defaults: exit {code:?}\n{out}"));
    }
    for (origin, path) in &all {
        let (code, out) = tlsbridge(
            cwd.path(),
            &["check", "--config", path.to_str().unwrap()],
            &[],
        );
        if code != Some(0) {
            failures.push(format!("{origin}: exit {code:?}\n{out}"));
        } else if !out.contains("configuration ok") {
            failures.push(format!("{origin}: unexpected output\n{out}"));
        }
    }
    assert!(failures.is_empty(), "{}", failures.join("\n"));
}

/// The image's environment applies on top of the defaults and of the compose config.
#[test]
fn the_image_environment_is_valid_config() {
    let env = image_env();
    assert!(
        env.iter().any(|(k, _)| k == "TLSBRIDGE__ADMIN__LISTEN"),
        "the Dockerfile no longer sets TLSBRIDGE__ADMIN__LISTEN: {env:?}"
    );
    let env = image_env_refs(&env);
    let defaults = Config::load_from(
        None,
        env.iter().map(|(k, v)| (k.to_string(), v.to_string())),
    )
    .expect("defaults + image ENV");
    let admin = defaults
        .admin
        .listen
        .expect("the image enables the admin endpoint");
    assert!(
        !is_loopback(&admin),
        "probes from outside the container need {admin} beyond loopback"
    );
    let cwd = tempfile::tempdir().unwrap();
    let (code, out) = tlsbridge(cwd.path(), &["check"], &env);
    assert_eq!(code, Some(0), "{out}");
    let compose = root().join("deploy/compose/tlsbridge.toml");
    load(&compose, &env).expect("compose config + image ENV");
}

#[test]
fn dockerfile_agrees_with_cargo_and_the_defaults() {
    // The builder's --features must exist in Cargo.toml.
    let manifest = config::Config::builder()
        .add_source(config::File::from_str(
            &read(&root().join("Cargo.toml")),
            config::FileFormat::Toml,
        ))
        .build()
        .unwrap();
    let features: BTreeSet<String> = manifest
        .get_table("features")
        .expect("Cargo.toml has [features]")
        .into_keys()
        .collect();
    let build = dockerfile().replace("\\\n", " ");
    let cargo_build = build
        .lines()
        .find(|l| l.contains("cargo build"))
        .expect("the Dockerfile runs cargo build");
    assert!(cargo_build.contains("--locked"), "{cargo_build}");
    assert!(
        features.contains("vendored"),
        "no feature `vendored`: {features:?}"
    );
    assert!(
        cargo_build.contains("--features \"vendored"),
        "{cargo_build}"
    );
    let documented = ["legacy-ciphers"];
    for feature in documented {
        assert!(
            features.contains(feature),
            "FEATURES={feature} is documented but missing"
        );
    }

    // EXPOSE = the default routes' ports + the admin port of the image's environment.
    let env = image_env();
    let defaults = Config::load_from(
        None,
        env.iter().map(|(k, v)| (k.to_string(), v.to_string())),
    )
    .unwrap();
    let exposed: BTreeSet<u16> = dockerfile_instruction("EXPOSE")
        .iter()
        .flat_map(|l| {
            l.split_whitespace()
                .map(|p| p.trim_end_matches("/tcp").parse().unwrap())
        })
        .collect();
    let mut wanted: BTreeSet<u16> = defaults.routes.iter().map(|r| r.listen.port()).collect();
    wanted.insert(defaults.admin.listen.unwrap().port());
    assert_eq!(exposed, wanted, "EXPOSE vs. default routes + admin");

    // WORKDIR (the runtime stage's: the last one) and VOLUMEs: certs/ and state/ of the
    // defaults live on the volumes.
    assert_eq!(
        dockerfile_instruction("WORKDIR").last().map(String::as_str),
        Some(IMAGE_WORKDIR)
    );
    let volumes = dockerfile_instruction("VOLUME").join(" ");
    for dir in [
        resolve_in_image(&defaults.state_dir),
        resolve_in_image(defaults.device_tls.cert.parent().unwrap()),
        resolve_in_image(defaults.device_tls.key.parent().unwrap()),
    ] {
        assert!(
            volumes.contains(&format!("\"{}\"", dir.display())),
            "{} is not a VOLUME: {volumes}",
            dir.display()
        );
    }
    // The HEALTHCHECK and the entry point use the binary's own subcommands.
    let health = dockerfile_instruction("HEALTHCHECK").join(" ");
    assert!(
        health.contains("CMD [\"/usr/local/bin/tlsbridge\", \"health\"]"),
        "{health}"
    );
    assert_eq!(
        dockerfile_instruction("ENTRYPOINT"),
        vec!["[\"/usr/local/bin/tlsbridge\"]".to_string()]
    );
    assert_eq!(dockerfile_instruction("CMD"), vec!["[\"run\"]".to_string()]);
}

/// Checks one pod template's tlsbridge container against the ConfigMap it mounts.
/// Returns the probe paths used.
fn check_pod(
    origin: &str,
    pod: &Value,
    configmaps: &BTreeMap<String, BTreeMap<String, String>>,
    failures: &mut Vec<String>,
) -> BTreeSet<String> {
    let mut paths = BTreeSet::new();
    let spec = &pod["spec"];
    let containers = spec["containers"]
        .as_sequence()
        .into_iter()
        .chain(spec["initContainers"].as_sequence())
        .flatten();
    let volumes: BTreeMap<&str, &Value> = spec["volumes"]
        .as_sequence()
        .into_iter()
        .flatten()
        .map(|v| (str_of(&v["name"]), v))
        .collect();
    let grace = spec["terminationGracePeriodSeconds"].as_u64().unwrap_or(30);
    for container in containers {
        if !str_of(&container["image"]).contains("tlsbridge") {
            continue;
        }
        let who = format!("{origin}: container {}", str_of(&container["name"]));
        let args: Vec<&str> = container["args"]
            .as_sequence()
            .into_iter()
            .flatten()
            .map(str_of)
            .collect();
        let Some(at) = args.iter().position(|a| *a == "--config") else {
            failures.push(format!("{who}: no --config in args {args:?}"));
            continue;
        };
        let config_path = args[at + 1];
        // The mount that provides the config file: a ConfigMap key (subPath) or directory.
        let mounts: Vec<&Value> = container["volumeMounts"]
            .as_sequence()
            .into_iter()
            .flatten()
            .collect();
        let mut text = None;
        for mount in &mounts {
            let mount_path = str_of(&mount["mountPath"]);
            let volume = volumes.get(str_of(&mount["name"]));
            let Some(cm) = volume.and_then(|v| v["configMap"]["name"].as_str()) else {
                continue;
            };
            let key = match mount["subPath"].as_str() {
                Some(sub) if mount_path == config_path => Some(sub.to_string()),
                None => config_path
                    .strip_prefix(&format!("{mount_path}/"))
                    .map(str::to_string),
                _ => None,
            };
            if let Some(key) = key {
                text = configmaps.get(cm).and_then(|data| data.get(&key)).cloned();
                if text.is_none() {
                    failures.push(format!("{who}: ConfigMap {cm} has no key {key}"));
                }
            }
        }
        let Some(text) = text else {
            failures.push(format!("{who}: nothing mounts {config_path}"));
            continue;
        };
        // The image's ENV (TLSBRIDGE__ADMIN__LISTEN) wins over the ConfigMap, as in the pod.
        let image_env = image_env();
        let config = load_text(&text, &image_env_refs(&image_env));

        let ports: BTreeMap<&str, u64> = container["ports"]
            .as_sequence()
            .into_iter()
            .flatten()
            .map(|p| (str_of(&p["name"]), p["containerPort"].as_u64().unwrap_or(0)))
            .collect();
        let port_numbers: BTreeSet<u64> = ports.values().copied().collect();
        for route in &config.routes {
            let port = u64::from(route.listen.port());
            if !is_loopback(&route.listen) && !port_numbers.contains(&port) {
                failures.push(format!(
                    "{who}: route {} listens on {} but no containerPort {port}",
                    route.name, route.listen
                ));
            }
        }
        let route_ports: BTreeSet<u64> = config
            .routes
            .iter()
            .map(|r| u64::from(r.listen.port()))
            .collect();
        let admin = config.admin.listen;
        for (name, port) in &ports {
            if !route_ports.contains(port) && admin.map(|a| u64::from(a.port())) != Some(*port) {
                failures.push(format!(
                    "{who}: containerPort {name}={port} matches nothing in the config"
                ));
            }
        }
        for probe in ["livenessProbe", "readinessProbe", "startupProbe"] {
            let get = &container[probe]["httpGet"];
            if get.is_null() {
                continue;
            }
            let path = str_of(&get["path"]).to_string();
            let port = match &get["port"] {
                Value::Number(n) => n.as_u64(),
                other => ports.get(str_of(other)).copied(),
            };
            match admin {
                None => failures.push(format!("{who}: {probe} but admin.listen is disabled")),
                Some(addr) if is_loopback(&addr) => failures.push(format!(
                    "{who}: {probe}: admin.listen {addr} is loopback, the kubelet cannot reach it"
                )),
                Some(addr) if port != Some(u64::from(addr.port())) => failures.push(format!(
                    "{who}: {probe} port {:?} is not admin.listen {addr}",
                    get["port"]
                )),
                Some(_) => {}
            }
            let want = match probe {
                "livenessProbe" => "/healthz",
                _ => "/readyz",
            };
            if path != want {
                failures.push(format!("{who}: {probe} asks {path}, expected {want}"));
            }
            paths.insert(path);
        }
        let ready =
            container["readinessProbe"].is_mapping() || container["startupProbe"].is_mapping();
        if !container["livenessProbe"].is_mapping() || !ready {
            failures.push(format!(
                "{who}: needs a liveness probe and a readiness or startup probe"
            ));
        }

        // With a read-only root filesystem, state_dir must be a mounted volume; so must the
        // certificate directory unless the certificate comes ready-made from a Secret.
        let read_only =
            container["securityContext"]["readOnlyRootFilesystem"].as_bool() == Some(true);
        let mounted = |dir: &Path| -> Option<&Value> {
            mounts
                .iter()
                .copied()
                .filter(|m| dir.starts_with(str_of(&m["mountPath"])))
                .max_by_key(|m| str_of(&m["mountPath"]).len())
        };
        let state = resolve_in_image(&config.state_dir);
        match mounted(&state) {
            Some(m) if m["readOnly"].as_bool() == Some(true) => failures.push(format!(
                "{who}: state_dir {} is mounted read-only",
                state.display()
            )),
            None if read_only => failures.push(format!(
                "{who}: state_dir {} is on the read-only root filesystem",
                state.display()
            )),
            _ => {}
        }
        let cert = resolve_in_image(&config.device_tls.cert);
        let key = resolve_in_image(&config.device_tls.key);
        match mounted(&cert) {
            Some(m) => {
                let volume = volumes.get(str_of(&m["name"]));
                if let Some(secret) = volume.and_then(|v| v["secret"]["secretName"].as_str()) {
                    // kubernetes.io/tls Secrets hold tls.crt and tls.key.
                    for file in [&cert, &key] {
                        let name = file.file_name().unwrap().to_str().unwrap();
                        if !["tls.crt", "tls.key"].contains(&name)
                            || !file.starts_with(str_of(&m["mountPath"]))
                        {
                            failures.push(format!(
                                "{who}: {} is not a key of the TLS Secret {secret}",
                                file.display()
                            ));
                        }
                    }
                } else if m["readOnly"].as_bool() == Some(true) {
                    failures.push(format!(
                        "{who}: {} would be generated into a read-only mount",
                        cert.display()
                    ));
                }
            }
            None if read_only => failures.push(format!(
                "{who}: {} would be generated on the read-only root filesystem",
                cert.display()
            )),
            None => {}
        }
        if grace <= config.limits.drain_timeout.as_secs() {
            failures.push(format!(
                "{who}: terminationGracePeriodSeconds {grace} does not exceed limits.drain_timeout {:?}",
                config.limits.drain_timeout
            ));
        }
    }
    paths
}

fn kubernetes_probe_paths(failures: &mut Vec<String>) -> BTreeSet<String> {
    let mut configmaps: BTreeMap<String, BTreeMap<String, String>> = BTreeMap::new();
    for (name, key, item) in configmap_tomls() {
        configmaps.entry(name).or_default().insert(key, item.text);
    }
    let mut paths = BTreeSet::new();
    let mut pods = 0;
    for path in deploy_files("yaml") {
        let docs = yaml_docs(&path);
        let origin = path.display().to_string();
        // Service targetPorts name container ports of the pods they select (same file or
        // deployment.yaml next to it).
        let mut container_ports: BTreeMap<String, u64> = BTreeMap::new();
        let siblings = path.parent().unwrap().join("deployment.yaml");
        for doc in docs.iter().chain(
            (if siblings.exists() {
                yaml_docs(&siblings)
            } else {
                Vec::new()
            })
            .iter(),
        ) {
            let spec = &doc["spec"]["template"]["spec"];
            for c in spec["containers"]
                .as_sequence()
                .into_iter()
                .chain(spec["initContainers"].as_sequence())
                .flatten()
            {
                for p in c["ports"].as_sequence().into_iter().flatten() {
                    container_ports.insert(
                        str_of(&p["name"]).to_string(),
                        p["containerPort"].as_u64().unwrap_or(0),
                    );
                }
            }
        }
        for doc in &docs {
            match str_of(&doc["kind"]) {
                "Deployment" | "StatefulSet" | "DaemonSet" => {
                    pods += 1;
                    let name = str_of(&doc["metadata"]["name"]);
                    paths.extend(check_pod(
                        &format!("{origin} ({name})"),
                        &doc["spec"]["template"],
                        &configmaps,
                        failures,
                    ));
                }
                "Service" => {
                    for p in doc["spec"]["ports"].as_sequence().into_iter().flatten() {
                        match &p["targetPort"] {
                            Value::String(name) if !container_ports.contains_key(name) => failures
                                .push(format!(
                                    "{origin}: Service {} targetPort {name} is no container port",
                                    str_of(&doc["metadata"]["name"])
                                )),
                            Value::Number(n)
                                if !container_ports.values().any(|v| Some(*v) == n.as_u64()) =>
                            {
                                failures.push(format!(
                                    "{origin}: Service {} targetPort {n} is no container port",
                                    str_of(&doc["metadata"]["name"])
                                ))
                            }
                            _ => {}
                        }
                    }
                }
                _ => {}
            }
        }
    }
    assert!(
        pods >= 2,
        "expected deployment.yaml and sidecar.yaml, found {pods} pod template(s)"
    );
    // kustomization.yaml lists files that exist.
    let kustomization = root().join("deploy/kubernetes/kustomization.yaml");
    for doc in yaml_docs(&kustomization) {
        for resource in doc["resources"].as_sequence().into_iter().flatten() {
            let file = kustomization.parent().unwrap().join(str_of(resource));
            if !file.exists() {
                failures.push(format!(
                    "kustomization.yaml lists missing {}",
                    file.display()
                ));
            }
        }
    }
    paths
}

#[test]
fn kubernetes_manifests_agree_with_their_config() {
    let mut failures = Vec::new();
    let paths = kubernetes_probe_paths(&mut failures);
    assert!(
        paths.contains("/healthz") && paths.contains("/readyz"),
        "{paths:?}"
    );
    assert!(failures.is_empty(), "{}", failures.join("\n"));
}

#[test]
fn compose_file_agrees_with_its_config_and_the_image() {
    let compose_dir = root().join("deploy/compose");
    let docs = yaml_docs(&compose_dir.join("docker-compose.yml"));
    let service = &docs[0]["services"]["tlsbridge"];
    assert!(service.is_mapping(), "no service tlsbridge");
    let command: Vec<&str> = service["command"]
        .as_sequence()
        .expect("command as a list")
        .iter()
        .map(str_of)
        .collect();
    let at = command
        .iter()
        .position(|a| *a == "--config")
        .expect("--config");
    let config_path = command[at + 1];
    // The bind mount that provides it.
    let volumes: Vec<&str> = service["volumes"]
        .as_sequence()
        .unwrap()
        .iter()
        .map(str_of)
        .collect();
    let source = volumes
        .iter()
        .find_map(|v| {
            let mut parts = v.split(':');
            let (src, dst) = (parts.next()?, parts.next()?);
            (dst == config_path).then(|| compose_dir.join(src))
        })
        .unwrap_or_else(|| panic!("no volume mounts {config_path}: {volumes:?}"));
    let env = image_env();
    let mut env: Vec<(&str, &str)> = image_env_refs(&env);
    let service_env: Vec<(String, String)> = match &service["environment"] {
        Value::Mapping(map) => map
            .iter()
            .map(|(k, v)| (str_of(k).to_string(), str_of(v).to_string()))
            .collect(),
        Value::Sequence(list) => list
            .iter()
            .filter_map(|v| str_of(v).split_once('=').map(|(k, v)| (k.into(), v.into())))
            .collect(),
        _ => Vec::new(),
    };
    env.extend(service_env.iter().map(|(k, v)| (k.as_str(), v.as_str())));
    let config = load(&source, &env).unwrap();

    // Published ports: "HOST:CONTAINER" or "IP:HOST:CONTAINER".
    let published: BTreeSet<u16> = service["ports"]
        .as_sequence()
        .unwrap()
        .iter()
        .map(|p| str_of(p).rsplit(':').next().unwrap().parse().unwrap())
        .collect();
    let mut failures = Vec::new();
    for route in &config.routes {
        if !is_loopback(&route.listen) && !published.contains(&route.listen.port()) {
            failures.push(format!(
                "route {} ({}) is not published",
                route.name, route.listen
            ));
        }
    }
    let admin = config.admin.listen.expect("admin enabled");
    let route_ports: BTreeSet<u16> = config.routes.iter().map(|r| r.listen.port()).collect();
    for port in &published {
        if !route_ports.contains(port) && *port != admin.port() {
            failures.push(format!("published container port {port} matches nothing"));
        }
    }
    // The admin port is published on the host's loopback only: /clients lists device IPs.
    let admin_mapping = service["ports"]
        .as_sequence()
        .unwrap()
        .iter()
        .map(str_of)
        .find(|p| p.ends_with(&format!(":{}", admin.port())))
        .unwrap_or("");
    if !admin_mapping.starts_with("127.0.0.1:") {
        failures.push(format!(
            "admin published as {admin_mapping:?}, not on 127.0.0.1"
        ));
    }
    // The image's HEALTHCHECK runs `tlsbridge health` without --config: defaults + environment.
    let health_config = Config::load_from(
        None,
        env.iter().map(|(k, v)| (k.to_string(), v.to_string())),
    )
    .unwrap();
    if health_config.admin.listen.map(|a| a.port()) != Some(admin.port()) {
        failures.push(format!(
            "HEALTHCHECK asks {:?}, the service listens on {admin}",
            health_config.admin.listen
        ));
    }
    // read_only: true → state_dir and the certificate directory are volumes.
    if service["read_only"].as_bool() == Some(true) {
        for dir in [
            resolve_in_image(&config.state_dir),
            resolve_in_image(config.device_tls.cert.parent().unwrap()),
        ] {
            let mounted = volumes.iter().any(|v| {
                let dst = v.split(':').nth(1).unwrap_or("");
                !v.ends_with(":ro") && dir.starts_with(dst)
            });
            if !mounted {
                failures.push(format!("{} is not a writable volume", dir.display()));
            }
        }
    }
    let grace = parse_duration(str_of(&service["stop_grace_period"]));
    if grace <= config.limits.drain_timeout {
        failures.push(format!("stop_grace_period {grace:?} <= drain_timeout"));
    }
    if str_of(&service["build"]["context"]) != "../.." {
        failures.push("build.context is not the repository root".into());
    }
    assert!(failures.is_empty(), "{}", failures.join("\n"));
}

/// The probe paths of the manifests and the health check's path answer 200 on a running admin
/// endpoint (readiness once the listeners are bound).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn probe_paths_are_served_by_the_admin_endpoint() {
    let mut failures = Vec::new();
    let mut paths = kubernetes_probe_paths(&mut failures);
    paths.insert(HEALTH_PATH.to_string());
    let dir = tempfile::tempdir().unwrap();
    let p = |path: PathBuf| serde_json::to_string(&path.display().to_string()).unwrap();
    let text = format!(
        "state_dir = {}\n[admin]\nlisten = \"127.0.0.1:0\"\n[device_tls]\ncert = {}\nkey = {}\n\
         [[route]]\nname = \"smtp\"\nlisten = \"127.0.0.1:0\"\nprotocol = \"smtp\"\n\
         device_tls = \"starttls\"\nupstream = \"localhost:9\"\nupstream_tls = \"starttls\"\n",
        p(dir.path().join("state")),
        p(dir.path().join("certs/tlsbridge.crt")),
        p(dir.path().join("certs/tlsbridge.key")),
    );
    let path = dir.path().join("tlsbridge.toml");
    std::fs::write(&path, text).unwrap();
    let config = load(&path, &[]).unwrap();
    let server = tlsbridge::server::Server::bind(config).await.unwrap();
    let admin = server.admin_addr().expect("admin bound");
    let (tx, rx) = tokio::sync::oneshot::channel::<()>();
    let task = tokio::spawn(server.run(async move {
        let _ = rx.await;
    }));
    for path in paths {
        let mut last = (0, String::new());
        for _ in 0..50 {
            let p = path.clone();
            last =
                tokio::task::spawn_blocking(move || tlsbridge::cli::admin_client::get(admin, &p))
                    .await
                    .unwrap()
                    .unwrap();
            if last.0 == 200 {
                break;
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        assert_eq!(last.0, 200, "{path}: {}", last.1);
    }
    let _ = tx.send(());
    tokio::time::timeout(Duration::from_secs(40), task)
        .await
        .unwrap()
        .unwrap()
        .unwrap();
    assert!(failures.is_empty(), "{}", failures.join("\n"));
}

#[test]
fn systemd_unit_agrees_with_its_config() {
    let unit_path = root().join("deploy/systemd/tlsbridge.service");
    let unit = read(&unit_path);
    let value = |key: &str| -> Vec<String> {
        unit.lines()
            .filter_map(|l| l.trim().strip_prefix(&format!("{key}=")))
            .map(str::to_string)
            .collect()
    };
    let exec = value("ExecStart").join(" ");
    let args: Vec<&str> = exec.split_whitespace().collect();
    let at = args
        .iter()
        .position(|a| *a == "--config")
        .expect("--config in ExecStart");
    let config_path = Path::new(args[at + 1]);
    assert_eq!(args[1], "run", "{exec}");
    assert_eq!(
        config_path.file_name().unwrap(),
        "tlsbridge.toml",
        "ExecStart reads {config_path:?}"
    );
    let config_dir = value("ConfigurationDirectory").join("");
    assert_eq!(
        config_path.parent().unwrap(),
        Path::new("/etc").join(&config_dir)
    );
    let config = load(&root().join("deploy/systemd/tlsbridge.toml"), &[]).unwrap();
    let mut failures = Vec::new();
    let workdir = value("WorkingDirectory").join("");
    let state_dir = value("StateDirectory").join("");
    let writable = Path::new("/var/lib").join(&state_dir);
    for path in [&config.state_dir, &config.device_tls.cert] {
        let full = Path::new(&workdir).join(path);
        if !full.starts_with(&writable) {
            failures.push(format!(
                "{} is outside the StateDirectory {} (ProtectSystem=strict)",
                full.display(),
                writable.display()
            ));
        }
    }
    let low_port = config.routes.iter().any(|r| r.listen.port() < 1024)
        || config.admin.listen.is_some_and(|a| a.port() < 1024);
    let caps = value("AmbientCapabilities").join(" ");
    if low_port && !caps.contains("CAP_NET_BIND_SERVICE") {
        failures.push("ports below 1024 without CAP_NET_BIND_SERVICE".into());
    }
    let stop = parse_duration(&format!("{}s", value("TimeoutStopSec").join("")));
    if stop <= config.limits.drain_timeout {
        failures.push(format!("TimeoutStopSec {stop:?} <= drain_timeout"));
    }
    let prevent = value("RestartPreventExitStatus").join(" ");
    if !prevent
        .split_whitespace()
        .any(|s| s == tlsbridge::cli::EXIT_USAGE.to_string())
    {
        failures.push(format!(
            "RestartPreventExitStatus {prevent:?} lacks the invalid-config exit code {}",
            tlsbridge::cli::EXIT_USAGE
        ));
    }
    assert!(failures.is_empty(), "{}", failures.join("\n"));
}

/// `systemd-analyze verify` on the unit, with ExecStart pointed at the test binary (verify
/// insists that the executable exists). Skipped where the command does not exist.
#[test]
fn systemd_unit_verifies() {
    if Command::new("systemd-analyze")
        .arg("--version")
        .output()
        .is_err()
    {
        eprintln!("skipped: systemd-analyze is not installed");
        return;
    }
    let unit = read(&root().join("deploy/systemd/tlsbridge.service"));
    let unit = unit.replace("/usr/local/bin/tlsbridge", env!("CARGO_BIN_EXE_tlsbridge"));
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("tlsbridge.service");
    std::fs::write(&path, unit).unwrap();
    let out = Command::new("systemd-analyze")
        .arg("verify")
        .arg(&path)
        .env("SYSTEMD_LOG_COLOR", "0")
        .output()
        .expect("systemd-analyze verify");
    let stderr = String::from_utf8_lossy(&out.stderr);
    // Warnings (unknown keys, bad values) leave the exit code at 0: any output is a failure.
    let complaints: Vec<&str> = stderr
        .lines()
        .filter(|l| l.contains("tlsbridge.service"))
        .collect();
    assert!(
        out.status.success() && complaints.is_empty(),
        "systemd-analyze verify: {}\n{stderr}",
        out.status
    );
}
