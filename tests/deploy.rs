//! The docker compose deployment, checked without Docker: `docker-compose.yml`,
//! the Prometheus config and the Grafana provisioning and dashboard under
//! `deploy/`. Files must exist and agree with each other, the dashboard's
//! PromQL may only name metrics that the library's catalogue
//! ([`satwatch::metrics::CATALOGUE`]) lists, and its SQL only tables and
//! columns that the library's migrations
//! ([`satwatch::postgres::MIGRATIONS`]) create.

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};

use satwatch::metrics::{Metrics, CATALOGUE};
use serde_yaml::Value;

const COMPOSE: &str = "docker-compose.yml";
const DASHBOARD: &str = "deploy/grafana/dashboards/satwatch.json";

// ------------------------------------------------------------------ files

fn repo() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

fn read(rel: &str) -> String {
    let path = repo().join(rel);
    std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("cannot read {}: {e}", path.display()))
}

fn parse_yaml(rel: &str, text: &str) -> Value {
    let mut value: Value =
        serde_yaml::from_str(text).unwrap_or_else(|e| panic!("{rel} is not valid YAML: {e}"));
    // Compose resolves `<<: *anchor` merge keys; so must we.
    value
        .apply_merge()
        .unwrap_or_else(|e| panic!("{rel}: bad merge key: {e}"));
    value
}

fn yaml_file(rel: &str) -> Value {
    parse_yaml(rel, &read(rel))
}

/// Fails with every problem at once, each on its own line.
fn fail_if_any(what: &str, problems: Vec<String>) {
    if !problems.is_empty() {
        panic!("{what}:\n  - {}", problems.join("\n  - "));
    }
}

// ------------------------------------------------------------------ compose

struct Compose {
    doc: Value,
}

impl Compose {
    fn load() -> Self {
        let doc = yaml_file(COMPOSE);
        assert!(
            doc.get("services").and_then(Value::as_mapping).is_some(),
            "{COMPOSE} has no services mapping"
        );
        Self { doc }
    }

    fn services(&self) -> Vec<(String, &Value)> {
        self.doc["services"]
            .as_mapping()
            .expect("checked in load")
            .iter()
            .map(|(k, v)| (k.as_str().expect("service names are strings").to_owned(), v))
            .collect()
    }

    fn service(&self, name: &str) -> &Value {
        self.doc["services"]
            .get(name)
            .unwrap_or_else(|| panic!("{COMPOSE} has no service `{name}`"))
    }

    /// The one service whose image starts with `prefix`.
    fn by_image(&self, prefix: &str) -> (String, &Value) {
        let found: Vec<_> = self
            .services()
            .into_iter()
            .filter(|(_, s)| image(s).is_some_and(|i| i.starts_with(prefix)))
            .collect();
        assert_eq!(
            found.len(),
            1,
            "{COMPOSE}: expected exactly one service with image {prefix}*, found {:?}",
            found.iter().map(|(n, _)| n).collect::<Vec<_>>()
        );
        found.into_iter().next().unwrap()
    }

    /// The service that runs `satwatch run`.
    fn satwatch(&self) -> (String, &Value) {
        let found: Vec<_> = self
            .services()
            .into_iter()
            .filter(|(_, s)| strings(&s["command"]).first().map(String::as_str) == Some("run"))
            .collect();
        assert_eq!(
            found.len(),
            1,
            "{COMPOSE}: expected one service running `satwatch run`"
        );
        found.into_iter().next().unwrap()
    }
}

fn image(service: &Value) -> Option<&str> {
    service.get("image").and_then(Value::as_str)
}

fn is_default(service: &Value) -> bool {
    service
        .get("profiles")
        .and_then(Value::as_sequence)
        .is_none_or(|p| p.is_empty())
}

/// A string or a list of strings (command, entrypoint).
fn strings(value: &Value) -> Vec<String> {
    match value {
        Value::String(s) => s.split_whitespace().map(str::to_owned).collect(),
        Value::Sequence(seq) => seq
            .iter()
            .map(|v| match v {
                Value::String(s) => s.clone(),
                other => serde_yaml::to_string(other).unwrap().trim().to_owned(),
            })
            .collect(),
        _ => Vec::new(),
    }
}

fn scalar(value: &Value) -> String {
    match value {
        Value::String(s) => s.clone(),
        Value::Null => String::new(),
        other => serde_yaml::to_string(other).unwrap().trim().to_owned(),
    }
}

/// `environment` as a map, from either the mapping or the `K=V` list form.
fn env(service: &Value) -> BTreeMap<String, String> {
    match service.get("environment") {
        Some(Value::Mapping(m)) => m.iter().map(|(k, v)| (scalar(k), scalar(v))).collect(),
        Some(Value::Sequence(seq)) => seq
            .iter()
            .filter_map(Value::as_str)
            .map(|kv| match kv.split_once('=') {
                Some((k, v)) => (k.to_owned(), v.to_owned()),
                None => (kv.to_owned(), String::new()),
            })
            .collect(),
        _ => BTreeMap::new(),
    }
}

fn env_var(service_name: &str, service: &Value, key: &str) -> String {
    env(service)
        .remove(key)
        .unwrap_or_else(|| panic!("{COMPOSE}: service `{service_name}` does not set {key}"))
}

struct Mount {
    source: String,
    target: String,
    bind: bool,
}

/// `volumes`, short (`src:dst[:mode]`) or long syntax.
fn mounts(service: &Value) -> Vec<Mount> {
    let Some(list) = service.get("volumes").and_then(Value::as_sequence) else {
        return Vec::new();
    };
    list.iter()
        .map(|v| match v {
            Value::String(s) => {
                let parts: Vec<&str> = s.split(':').collect();
                let (source, target) = match parts.as_slice() {
                    [target] => ("", *target),
                    [source, target, ..] => (*source, *target),
                    [] => unreachable!(),
                };
                Mount {
                    source: source.to_owned(),
                    target: target.to_owned(),
                    bind: is_host_path(source),
                }
            }
            Value::Mapping(_) => {
                let source = scalar(&v["source"]);
                Mount {
                    bind: v["type"].as_str() == Some("bind") || is_host_path(&source),
                    source,
                    target: scalar(&v["target"]),
                }
            }
            other => panic!("{COMPOSE}: unexpected volume entry {other:?}"),
        })
        .collect()
}

fn is_host_path(source: &str) -> bool {
    source.starts_with("./")
        || source.starts_with("../")
        || source.starts_with('/')
        || source.starts_with('~')
        || source == "."
}

/// A host path from the compose file, relative to the repository root.
fn host_path(source: &str) -> PathBuf {
    repo().join(source.trim_start_matches("./"))
}

/// The host path that a container path of `service` comes from, through its
/// bind mounts (the longest mount target that contains it).
fn host_path_of(service_name: &str, service: &Value, container_path: &str) -> PathBuf {
    let container_path = container_path.trim_end_matches('/');
    mounts(service)
        .into_iter()
        .filter(|m| m.bind)
        .filter_map(|m| {
            let target = m.target.trim_end_matches('/').to_owned();
            let rest = if container_path == target {
                Some(String::new())
            } else {
                container_path
                    .strip_prefix(&format!("{target}/"))
                    .map(str::to_owned)
            }?;
            Some((target.len(), host_path(&m.source).join(rest)))
        })
        .max_by_key(|(len, _)| *len)
        .map(|(_, path)| path)
        .unwrap_or_else(|| {
            panic!("{COMPOSE}: service `{service_name}` mounts nothing from the repository at {container_path}")
        })
}

fn published_host_ports(service: &Value) -> Vec<(String, String)> {
    // ("host port", "container port") from "ip:host:container", "host:container" or "container".
    service
        .get("ports")
        .and_then(Value::as_sequence)
        .map(|ports| {
            ports
                .iter()
                .map(|p| match p {
                    Value::Mapping(_) => (scalar(&p["published"]), scalar(&p["target"])),
                    other => {
                        let s = scalar(other);
                        let parts: Vec<&str> = s.split(':').collect();
                        let container = parts.last().unwrap().split('/').next().unwrap().to_owned();
                        let host = if parts.len() >= 2 {
                            parts[parts.len() - 2]
                        } else {
                            ""
                        };
                        (host.to_owned(), container)
                    }
                })
                .collect()
        })
        .unwrap_or_default()
}

/// `host:port`, with the port required.
fn host_port(addr: &str) -> (String, u16) {
    let (host, port) = addr
        .rsplit_once(':')
        .unwrap_or_else(|| panic!("`{addr}` is not host:port"));
    let port = port
        .parse()
        .unwrap_or_else(|_| panic!("`{addr}`: port `{port}` is not a number"));
    (host.to_owned(), port)
}

#[test]
fn compose_services_are_coherent() {
    let compose = Compose::load();
    let services = compose.services();
    let names: BTreeSet<&str> = services.iter().map(|(n, _)| n.as_str()).collect();
    let declared_volumes: BTreeSet<String> = compose
        .doc
        .get("volumes")
        .and_then(Value::as_mapping)
        .map(|m| m.keys().map(scalar).collect())
        .unwrap_or_default();
    let built_images: BTreeSet<&str> = services
        .iter()
        .filter(|(_, s)| s.get("build").is_some())
        .filter_map(|(_, s)| image(s))
        .collect();
    let mut problems = Vec::new();
    let mut host_ports: BTreeMap<String, String> = BTreeMap::new();
    for (name, service) in &services {
        let build = service.get("build");
        match (image(service), build) {
            (None, None) => problems.push(format!("service `{name}` has neither image nor build")),
            (Some(img), None) => {
                if built_images.contains(img) {
                    problems.push(format!(
                        "service `{name}` uses image {img}, which other services build, without `build`: compose would try to pull it"
                    ));
                } else {
                    let tag = img
                        .rsplit('/')
                        .next()
                        .unwrap()
                        .split_once(':')
                        .map(|(_, t)| t);
                    match tag {
                        None | Some("") | Some("latest") => problems.push(format!(
                            "service `{name}`: image {img} is not pinned to a version tag"
                        )),
                        Some(_) => {}
                    }
                }
            }
            (_, Some(build)) => {
                let (context, dockerfile) = match build {
                    Value::String(c) => (c.clone(), "Dockerfile".to_owned()),
                    Value::Mapping(_) => (
                        build
                            .get("context")
                            .map(scalar)
                            .unwrap_or_else(|| ".".into()),
                        build
                            .get("dockerfile")
                            .map(scalar)
                            .unwrap_or_else(|| "Dockerfile".into()),
                    ),
                    other => {
                        problems.push(format!("service `{name}`: bad build {other:?}"));
                        continue;
                    }
                };
                let context = host_path(&context);
                if !context.is_dir() {
                    problems.push(format!(
                        "service `{name}`: build context {} is missing",
                        context.display()
                    ));
                } else if !context.join(&dockerfile).is_file() {
                    problems.push(format!(
                        "service `{name}`: {dockerfile} missing in the build context"
                    ));
                }
            }
        }
        if let Some(deps) = service.get("depends_on") {
            let deps: Vec<String> = match deps {
                Value::Mapping(m) => m.keys().map(scalar).collect(),
                other => strings(other),
            };
            for dep in deps {
                if !names.contains(dep.as_str()) {
                    problems.push(format!(
                        "service `{name}` depends on unknown service `{dep}`"
                    ));
                }
            }
        }
        for mount in mounts(service) {
            if !mount.bind && !mount.source.is_empty() && !declared_volumes.contains(&mount.source)
            {
                problems.push(format!(
                    "service `{name}` mounts named volume `{}`, which the top-level volumes do not declare",
                    mount.source
                ));
            }
        }
        for (host, _) in published_host_ports(service) {
            if host.is_empty() {
                continue;
            }
            if let Some(other) = host_ports.insert(host.clone(), name.clone()) {
                problems.push(format!(
                    "host port {host} is published by both `{other}` and `{name}`"
                ));
            }
        }
    }
    // What a plain `docker compose up` starts.
    for required in ["kafka", "postgres", "init-kafka", "satwatch"] {
        if !names.contains(required) || !is_default(compose.service(required)) {
            problems.push(format!(
                "service `{required}` must exist and start by default"
            ));
        }
    }
    let (prom, prom_service) = compose.by_image("prom/prometheus");
    if !is_default(prom_service) {
        problems.push(format!("`{prom}` must start by default (no profiles)"));
    }
    let (grafana, grafana_service) = compose.by_image("grafana/grafana-oss");
    if !is_default(grafana_service) {
        problems.push(format!("`{grafana}` must start by default (no profiles)"));
    }
    if !published_host_ports(grafana_service)
        .iter()
        .any(|(h, c)| h == "3000" && c == "3000")
    {
        problems.push(format!("`{grafana}` must publish port 3000"));
    }
    let replay = compose.service("replay");
    if is_default(replay) {
        problems.push("`replay` must sit under a profile (it is a one-off)".into());
    }
    fail_if_any(&format!("{COMPOSE} is incoherent"), problems);
}

#[test]
fn compose_host_files_exist() {
    let compose = Compose::load();
    let mut problems = Vec::new();
    let mut checked = 0;
    for (name, service) in compose.services() {
        for mount in mounts(service).into_iter().filter(|m| m.bind) {
            if mount.source.starts_with('/') || mount.source.starts_with('~') {
                problems.push(format!(
                    "service `{name}` mounts {} from outside the repository",
                    mount.source
                ));
                continue;
            }
            checked += 1;
            if !host_path(&mount.source).exists() {
                problems.push(format!(
                    "service `{name}` mounts {}, which does not exist",
                    mount.source
                ));
            }
        }
        if let Some(files) = service.get("env_file") {
            for file in strings(files) {
                checked += 1;
                if !host_path(&file).is_file() {
                    problems.push(format!("service `{name}`: env_file {file} does not exist"));
                }
            }
        }
        // Scripts and pipeline files named on the command line are copied
        // into the image from the repository (see the Dockerfile).
        let words: Vec<String> = strings(&service["entrypoint"])
            .into_iter()
            .chain(strings(&service["command"]))
            .collect();
        for (i, word) in words.iter().enumerate() {
            let after_pipeline = i > 0 && words[i - 1] == "--pipeline";
            if word.starts_with("./") || after_pipeline {
                checked += 1;
                if !host_path(word).is_file() {
                    problems.push(format!(
                        "service `{name}` runs with {word}, which is not in the repository"
                    ));
                }
            }
        }
    }
    fail_if_any(&format!("{COMPOSE} refers to missing files"), problems);
    assert!(
        checked >= 5,
        "expected the compose file to refer to repository files, checked {checked}"
    );
}

#[test]
fn satwatch_talks_to_the_compose_kafka_and_postgres() {
    let compose = Compose::load();
    let (name, satwatch) = compose.satwatch();
    let (kafka_name, kafka) = compose.by_image("apache/kafka");
    let (pg_name, pg) = compose.by_image("postgres");

    let advertised = env_var(&kafka_name, kafka, "KAFKA_ADVERTISED_LISTENERS");
    let brokers = env_var(&name, satwatch, "SATWATCH_BROKERS");
    for broker in brokers.split(',') {
        let (host, port) = host_port(broker.trim());
        assert_eq!(
            host, kafka_name,
            "SATWATCH_BROKERS {broker} is not the `{kafka_name}` service"
        );
        assert!(
            advertised
                .split(',')
                .any(|l| l.ends_with(&format!("://{host}:{port}"))),
            "SATWATCH_BROKERS {broker} is not one of kafka's advertised listeners ({advertised})"
        );
    }

    let url = env_var(&name, satwatch, "DATABASE_URL");
    let rest = url
        .strip_prefix("postgres://")
        .or_else(|| url.strip_prefix("postgresql://"))
        .unwrap_or_else(|| panic!("DATABASE_URL {url} is not a postgres:// URL"));
    let (userinfo, hostpart) = rest
        .rsplit_once('@')
        .unwrap_or_else(|| panic!("DATABASE_URL {url} has no user"));
    let (user, password) = userinfo.split_once(':').unwrap_or((userinfo, ""));
    let (addr, db) = hostpart
        .split_once('/')
        .unwrap_or_else(|| panic!("DATABASE_URL {url} names no database"));
    let db = db.split('?').next().unwrap();
    let (host, port) = host_port(addr);
    assert_eq!(
        host, pg_name,
        "DATABASE_URL host is not the `{pg_name}` service"
    );
    assert_eq!(port, 5432, "DATABASE_URL port");
    assert_eq!(
        db,
        env_var(&pg_name, pg, "POSTGRES_DB"),
        "DATABASE_URL database"
    );
    assert_eq!(
        user,
        env_var(&pg_name, pg, "POSTGRES_USER"),
        "DATABASE_URL user"
    );
    assert_eq!(
        password,
        env_var(&pg_name, pg, "POSTGRES_PASSWORD"),
        "DATABASE_URL password must be the same expression as POSTGRES_PASSWORD"
    );

    let http = env_var(&name, satwatch, "SATWATCH_HTTP_ADDR");
    let (bind, port) = host_port(&http);
    assert_eq!(
        bind, "0.0.0.0",
        "SATWATCH_HTTP_ADDR must listen beyond the container's loopback"
    );
    assert_eq!(port, 8000, "SATWATCH_HTTP_ADDR port");
}

#[test]
fn prometheus_scrapes_satwatch_metrics() {
    let compose = Compose::load();
    let (sat_name, _) = compose.satwatch();
    let (name, prom) = compose.by_image("prom/prometheus");
    let config_in_container = strings(&prom["command"])
        .iter()
        .find_map(|a| a.strip_prefix("--config.file=").map(str::to_owned))
        .unwrap_or_else(|| "/etc/prometheus/prometheus.yml".into());
    let config_path = host_path_of(&name, prom, &config_in_container);
    let rel = config_path
        .strip_prefix(repo())
        .unwrap()
        .to_string_lossy()
        .into_owned();
    let config = yaml_file(&rel);
    let jobs = config["scrape_configs"]
        .as_sequence()
        .unwrap_or_else(|| panic!("{rel} has no scrape_configs"));
    let target = format!("{sat_name}:8000");
    let scraping = jobs.iter().find(|job| {
        job["static_configs"]
            .as_sequence()
            .is_some_and(|sc| sc.iter().any(|c| strings(&c["targets"]).contains(&target)))
    });
    let job = scraping.unwrap_or_else(|| panic!("{rel}: no scrape job targets {target}"));
    let path = job
        .get("metrics_path")
        .map(scalar)
        .unwrap_or_else(|| "/metrics".into());
    assert_eq!(path, "/metrics", "{rel}: metrics_path of the satwatch job");
    let scheme = job
        .get("scheme")
        .map(scalar)
        .unwrap_or_else(|| "http".into());
    assert_eq!(scheme, "http", "{rel}: satwatch serves plain HTTP");
    // The dashboard's `up{job="satwatch"}` relies on the job name.
    assert_eq!(scalar(&job["job_name"]), "satwatch", "{rel}: job_name");
}

// ------------------------------------------------------------------ grafana

struct Datasource {
    uid: String,
    kind: String,
    url: String,
    raw: Value,
}

fn grafana_files(dir: &Path) -> Vec<PathBuf> {
    let mut files: Vec<PathBuf> = std::fs::read_dir(dir)
        .unwrap_or_else(|e| panic!("cannot list {}: {e}", dir.display()))
        .map(|e| e.unwrap().path())
        .filter(|p| matches!(p.extension().and_then(|e| e.to_str()), Some("yml" | "yaml")))
        .collect();
    files.sort();
    assert!(
        !files.is_empty(),
        "no provisioning YAML in {}",
        dir.display()
    );
    files
}

fn rel(path: &Path) -> String {
    path.strip_prefix(repo())
        .unwrap_or(path)
        .to_string_lossy()
        .into_owned()
}

fn provisioned_datasources(compose: &Compose) -> Vec<Datasource> {
    let (name, grafana) = compose.by_image("grafana/grafana-oss");
    let dir = host_path_of(&name, grafana, "/etc/grafana/provisioning/datasources");
    let mut out = Vec::new();
    for file in grafana_files(&dir) {
        let doc = yaml_file(&rel(&file));
        assert_eq!(
            doc["apiVersion"].as_u64(),
            Some(1),
            "{}: apiVersion",
            rel(&file)
        );
        for ds in doc["datasources"].as_sequence().into_iter().flatten() {
            out.push(Datasource {
                uid: scalar(&ds["uid"]),
                kind: scalar(&ds["type"]),
                url: scalar(&ds["url"]),
                raw: ds.clone(),
            });
        }
    }
    out
}

#[test]
fn grafana_datasources_point_at_the_compose_services() {
    let compose = Compose::load();
    let (gname, grafana) = compose.by_image("grafana/grafana-oss");
    let (prom_name, _) = compose.by_image("prom/prometheus");
    let (pg_name, pg) = compose.by_image("postgres");
    let sources = provisioned_datasources(&compose);
    let prom: Vec<_> = sources.iter().filter(|d| d.kind == "prometheus").collect();
    assert_eq!(prom.len(), 1, "expected one Prometheus data source");
    assert_eq!(
        prom[0].url,
        format!("http://{prom_name}:9090"),
        "Prometheus data source url"
    );
    let sql: Vec<_> = sources
        .iter()
        .filter(|d| d.kind == "grafana-postgresql-datasource" || d.kind == "postgres")
        .collect();
    assert_eq!(sql.len(), 1, "expected one PostgreSQL data source");
    let ds = sql[0];
    assert_eq!(
        ds.url,
        format!("{pg_name}:5432"),
        "PostgreSQL data source url"
    );
    let db = ds.raw["jsonData"]
        .get("database")
        .or_else(|| ds.raw.get("database"))
        .map(scalar)
        .unwrap_or_default();
    assert_eq!(
        db,
        env_var(&pg_name, pg, "POSTGRES_DB"),
        "PostgreSQL data source database"
    );
    assert_eq!(
        scalar(&ds.raw["user"]),
        env_var(&pg_name, pg, "POSTGRES_USER"),
        "PostgreSQL data source user"
    );
    // The password is `$VAR`/`${VAR}` from Grafana's environment, which must
    // carry the same value PostgreSQL was started with.
    let password = scalar(&ds.raw["secureJsonData"]["password"]);
    let var = password
        .trim_start_matches('$')
        .trim_start_matches('{')
        .trim_end_matches('}');
    assert!(
        password.starts_with('$') && !var.is_empty(),
        "PostgreSQL data source password should come from the environment, got `{password}`"
    );
    assert_eq!(
        env_var(&gname, grafana, var),
        env_var(&pg_name, pg, "POSTGRES_PASSWORD"),
        "Grafana's {var} must match PostgreSQL's POSTGRES_PASSWORD"
    );
    let uids: BTreeSet<&str> = sources.iter().map(|d| d.uid.as_str()).collect();
    assert_eq!(
        uids.len(),
        sources.len(),
        "data source uids must be set and distinct"
    );
}

#[test]
fn grafana_dashboard_provider_loads_the_repository_dashboard() {
    let compose = Compose::load();
    let (name, grafana) = compose.by_image("grafana/grafana-oss");
    let dir = host_path_of(&name, grafana, "/etc/grafana/provisioning/dashboards");
    let dashboard = repo().join(DASHBOARD);
    let mut found = false;
    for file in grafana_files(&dir) {
        let doc = yaml_file(&rel(&file));
        assert_eq!(
            doc["apiVersion"].as_u64(),
            Some(1),
            "{}: apiVersion",
            rel(&file)
        );
        for provider in doc["providers"].as_sequence().into_iter().flatten() {
            assert_eq!(
                scalar(&provider["type"]),
                "file",
                "{}: provider type",
                rel(&file)
            );
            let path = scalar(&provider["options"]["path"]);
            assert!(
                !path.is_empty(),
                "{}: provider without options.path",
                rel(&file)
            );
            let host = host_path_of(&name, grafana, &path);
            assert!(
                host.is_dir(),
                "{}: {path} maps to {}, which is not a folder",
                rel(&file),
                host.display()
            );
            if host.join("satwatch.json") == dashboard {
                found = true;
            }
        }
    }
    assert!(
        found,
        "no dashboard provider reads the folder that holds {DASHBOARD}"
    );
    if let Some(home) = env(grafana).get("GF_DASHBOARDS_DEFAULT_HOME_DASHBOARD_PATH") {
        assert_eq!(
            host_path_of(&name, grafana, home),
            dashboard,
            "GF_DASHBOARDS_DEFAULT_HOME_DASHBOARD_PATH"
        );
    }
    // Every data source the dashboard names is provisioned, with the same type.
    let sources = provisioned_datasources(&compose);
    let by_uid: BTreeMap<&str, &str> = sources
        .iter()
        .map(|d| (d.uid.as_str(), d.kind.as_str()))
        .collect();
    let dash = Dashboard::load();
    let mut problems = Vec::new();
    for q in &dash.queries {
        match by_uid.get(q.ds_uid.as_str()) {
            None => problems.push(format!(
                "{}: data source uid `{}` is not provisioned",
                q.place, q.ds_uid
            )),
            Some(kind) if *kind != q.ds_type => problems.push(format!(
                "{}: data source `{}` is a {kind}, the dashboard says {}",
                q.place, q.ds_uid, q.ds_type
            )),
            Some(_) => {}
        }
    }
    fail_if_any(
        &format!("{DASHBOARD} names data sources that are not provisioned"),
        problems,
    );
}

// ------------------------------------------------------------------ dashboard

struct Query {
    /// Panel title and refId (or the template variable), for messages.
    place: String,
    ds_type: String,
    ds_uid: String,
    text: String,
    legend: String,
}

struct Dashboard {
    queries: Vec<Query>,
    variables: BTreeSet<String>,
}

impl Dashboard {
    fn load() -> Self {
        let json: serde_json::Value = serde_json::from_str(&read(DASHBOARD))
            .unwrap_or_else(|e| panic!("{DASHBOARD} is not valid JSON: {e}"));
        let mut queries = Vec::new();
        let mut ids = BTreeSet::new();
        let mut stack: Vec<&serde_json::Value> = json["panels"]
            .as_array()
            .unwrap_or_else(|| panic!("{DASHBOARD} has no panels"))
            .iter()
            .collect();
        while let Some(panel) = stack.pop() {
            let title = panel["title"].as_str().unwrap_or("?");
            let id = panel["id"]
                .as_u64()
                .unwrap_or_else(|| panic!("panel `{title}` has no id"));
            assert!(ids.insert(id), "{DASHBOARD}: panel id {id} is used twice");
            assert!(
                panel["gridPos"].is_object(),
                "panel `{title}` has no gridPos"
            );
            stack.extend(panel["panels"].as_array().into_iter().flatten());
            for target in panel["targets"].as_array().into_iter().flatten() {
                let ds = if target["datasource"].is_object() {
                    &target["datasource"]
                } else {
                    &panel["datasource"]
                };
                let text = target["expr"]
                    .as_str()
                    .or_else(|| target["rawSql"].as_str())
                    .unwrap_or_else(|| {
                        panic!("panel `{title}` has a target with neither expr nor rawSql")
                    });
                queries.push(Query {
                    place: format!(
                        "panel `{title}` query {}",
                        target["refId"].as_str().unwrap_or("?")
                    ),
                    ds_type: ds["type"].as_str().unwrap_or_default().to_owned(),
                    ds_uid: ds["uid"].as_str().unwrap_or_default().to_owned(),
                    text: text.to_owned(),
                    legend: target["legendFormat"]
                        .as_str()
                        .unwrap_or_default()
                        .to_owned(),
                });
            }
        }
        let mut variables = BTreeSet::new();
        for var in json["templating"]["list"].as_array().into_iter().flatten() {
            let name = var["name"].as_str().expect("template variables have names");
            variables.insert(name.to_owned());
            if var["type"] == "query" {
                let text = var["query"]
                    .as_str()
                    .or_else(|| var["query"]["rawSql"].as_str())
                    .or_else(|| var["definition"].as_str())
                    .unwrap_or_default();
                queries.push(Query {
                    place: format!("template variable `{name}`"),
                    ds_type: var["datasource"]["type"]
                        .as_str()
                        .unwrap_or_default()
                        .to_owned(),
                    ds_uid: var["datasource"]["uid"]
                        .as_str()
                        .unwrap_or_default()
                        .to_owned(),
                    text: text.to_owned(),
                    legend: String::new(),
                });
            }
        }
        Self { queries, variables }
    }

    fn prometheus(&self) -> impl Iterator<Item = &Query> {
        self.queries.iter().filter(|q| q.ds_type == "prometheus")
    }

    fn sql(&self) -> impl Iterator<Item = &Query> {
        self.queries
            .iter()
            .filter(|q| q.ds_type == "grafana-postgresql-datasource" || q.ds_type == "postgres")
    }
}

fn is_ident_start(c: char) -> bool {
    c.is_ascii_alphabetic() || c == '_'
}

fn is_ident_char(c: char) -> bool {
    c.is_ascii_alphanumeric() || c == '_'
}

/// Grafana variables used in a query (`$name`, `${name}`, `[[name]]`), leaving
/// out Grafana's own `$__...` macros.
fn variables_used(text: &str) -> BTreeSet<String> {
    let mut out = BTreeSet::new();
    let chars: Vec<char> = text.chars().collect();
    let mut i = 0;
    while i < chars.len() {
        if chars[i] == '$' {
            let braced = chars.get(i + 1) == Some(&'{');
            let start = i + 1 + braced as usize;
            let mut end = start;
            while end < chars.len() && is_ident_char(chars[end]) {
                end += 1;
            }
            let name: String = chars[start..end].iter().collect();
            if !name.is_empty() && !name.starts_with("__") {
                out.insert(name);
            }
            i = end.max(i + 1);
        } else {
            i += 1;
        }
    }
    out
}

// ------------------------------------------------------------------ metrics

struct Exported {
    /// Series names PromQL may select: counters and gauges as written, and
    /// `_bucket`/`_sum`/`_count` for histograms.
    series: BTreeSet<String>,
    labels: BTreeSet<String>,
}

fn exported_metrics() -> Exported {
    let mut series = BTreeSet::new();
    // Prometheus adds `le` to histogram buckets, `job` and `instance` to
    // every series it scrapes.
    let mut labels: BTreeSet<String> = ["le", "job", "instance"].map(String::from).into();
    for family in CATALOGUE {
        series.extend(family.series());
        labels.extend(family.labels.iter().map(|l| (*l).to_owned()));
    }
    // The catalogue agrees with what the library registers: every family
    // that renders without observations is among its names.
    let rendered = Metrics::new().render();
    for line in rendered.lines().filter(|l| l.starts_with("# TYPE ")) {
        let mut parts = line.split_whitespace().skip(2);
        let (name, kind) = (parts.next().unwrap(), parts.next().unwrap_or(""));
        let probe = if kind == "histogram" {
            format!("{name}_bucket")
        } else {
            name.to_owned()
        };
        assert!(
            series.contains(&probe),
            "satwatch::metrics::CATALOGUE lacks `{name}` ({kind}), which Metrics::new() registers"
        );
    }
    assert!(
        series.contains("satwatch_samples_consumed_total") && labels.contains("subsystem"),
        "satwatch::metrics::CATALOGUE lists no metrics: {series:?}"
    );
    Exported { series, labels }
}

/// Metric names (identifiers starting with `satwatch_`) and label names in a
/// PromQL expression and its legend.
fn promql_names(expr: &str, legend: &str) -> (BTreeSet<String>, BTreeSet<String>) {
    // Drop string literals (label values), keeping their quotes' places.
    let mut clean = String::new();
    let mut quote = None;
    for c in expr.chars() {
        match quote {
            Some(q) if c == q => {
                quote = None;
                clean.push(' ');
            }
            Some(_) => {}
            None if c == '"' || c == '\'' || c == '`' => quote = Some(c),
            None => clean.push(c),
        }
    }
    let chars: Vec<char> = clean.chars().collect();
    let mut tokens: Vec<(usize, String)> = Vec::new();
    let mut i = 0;
    while i < chars.len() {
        let c = chars[i];
        if c == '$' {
            // Grafana variables and macros like $__rate_interval.
            i += 1;
            while i < chars.len() && (is_ident_char(chars[i]) || chars[i] == '{' || chars[i] == '}')
            {
                i += 1;
            }
        } else if is_ident_start(c) || c == ':' {
            let start = i;
            while i < chars.len() && (is_ident_char(chars[i]) || chars[i] == ':') {
                i += 1;
            }
            tokens.push((start, chars[start..i].iter().collect()));
        } else if c.is_ascii_digit() || c == '.' {
            // Numbers (1e6, 0.99) and durations.
            while i < chars.len() && (chars[i].is_ascii_alphanumeric() || chars[i] == '.') {
                i += 1;
            }
        } else {
            i += 1;
        }
    }
    let metrics = tokens
        .iter()
        .filter(|(_, t)| t.starts_with("satwatch_"))
        .map(|(_, t)| t.clone())
        .collect();
    let mut labels = BTreeSet::new();
    // `by (...)`, `without (...)`, `on (...)`, `ignoring (...)`, `group_left (...)`, `group_right (...)`
    // and label matchers `{name=...}`.
    let mut depth_brace = 0;
    let mut grouping = false;
    let mut last_keyword = String::new();
    let mut ti = 0;
    let mut ci = 0;
    while ci < chars.len() {
        if ti < tokens.len() && tokens[ti].0 == ci {
            let tok = &tokens[ti].1;
            if depth_brace > 0 || grouping {
                labels.insert(tok.clone());
            }
            last_keyword = tok.clone();
            ci += tok.chars().count();
            ti += 1;
            continue;
        }
        match chars[ci] {
            '{' => depth_brace += 1,
            '}' => depth_brace -= 1,
            '(' if matches!(
                last_keyword.as_str(),
                "by" | "without" | "on" | "ignoring" | "group_left" | "group_right"
            ) =>
            {
                grouping = true
            }
            ')' => grouping = false,
            c if !c.is_whitespace() => last_keyword.clear(),
            _ => {}
        }
        ci += 1;
    }
    // Legends: {{label}}.
    let mut rest = legend;
    while let Some(open) = rest.find("{{") {
        let after = &rest[open + 2..];
        let close = after.find("}}").unwrap_or(after.len());
        labels.insert(after[..close].trim().to_owned());
        rest = &after[close..];
    }
    (metrics, labels)
}

#[test]
fn dashboard_prometheus_queries_use_exported_metrics() {
    let exported = exported_metrics();
    let dash = Dashboard::load();
    let mut problems = Vec::new();
    let mut seen = 0;
    for q in dash.prometheus() {
        let (metrics, labels) = promql_names(&q.text, &q.legend);
        for m in metrics {
            seen += 1;
            if !exported.series.contains(&m) {
                problems.push(format!(
                    "{}: metric `{m}` is not in satwatch::metrics::CATALOGUE",
                    q.place
                ));
            }
        }
        for l in labels {
            if !exported.labels.contains(&l) {
                problems.push(format!(
                    "{}: label `{l}` is not a label of any satwatch metric",
                    q.place
                ));
            }
        }
        for v in variables_used(&q.text) {
            if !dash.variables.contains(&v) {
                problems.push(format!("{}: variable `${v}` is not defined", q.place));
            }
        }
    }
    fail_if_any(
        &format!("{DASHBOARD} queries Prometheus for what satwatch does not export"),
        problems,
    );
    assert!(
        seen >= 10,
        "expected the dashboard to query satwatch metrics, found {seen}"
    );
    // The panels the deployment promises.
    let all: String = dash
        .prometheus()
        .map(|q| q.text.as_str())
        .collect::<Vec<_>>()
        .join("\n");
    for needed in [
        "satwatch_samples_consumed_total",
        "satwatch_samples_scored_total",
        "satwatch_end_to_end_latency_seconds_bucket",
        "satwatch_consumer_lag",
        "satwatch_dead_letters_total",
        "satwatch_inference_count_total",
        "satwatch_inference_exec_count_total",
        "satwatch_inference_queue_duration_us_total",
        "satwatch_inference_compute_input_duration_us_total",
        "satwatch_inference_compute_infer_duration_us_total",
    ] {
        assert!(all.contains(needed), "{DASHBOARD}: no panel shows {needed}");
    }
}

#[test]
fn promql_scanner_finds_names_and_labels() {
    let (m, l) = promql_names(
        r#"sum by (subsystem) (rate(satwatch_x_total{reason="a b",topic=~"t.*"}[$__rate_interval])) / 1e6"#,
        "{{partition}} {{ model }}",
    );
    assert_eq!(m, ["satwatch_x_total".to_owned()].into());
    assert_eq!(
        l,
        ["model", "partition", "reason", "subsystem", "topic"]
            .map(String::from)
            .into()
    );
}

// ------------------------------------------------------------------ SQL

/// Table -> columns, from the `CREATE TABLE` (and `ALTER TABLE ... ADD COLUMN`)
/// statements of the library's migrations.
fn schema() -> BTreeMap<String, BTreeSet<String>> {
    let lower = satwatch::postgres::MIGRATIONS
        .join("\n")
        .to_ascii_lowercase();
    let mut tables: BTreeMap<String, BTreeSet<String>> = BTreeMap::new();
    let words = |s: &str| -> Vec<String> {
        s.split(|c: char| !is_ident_char(c))
            .filter(|w| !w.is_empty())
            .map(str::to_owned)
            .collect()
    };
    let mut at = 0;
    while let Some(found) = lower[at..].find("create table") {
        let pos = at + found + "create table".len();
        let open = pos
            + lower[pos..]
                .find('(')
                .expect("CREATE TABLE has a column list");
        let name = lower[pos..open]
            .trim()
            .trim_start_matches("if not exists")
            .trim()
            .to_owned();
        let mut depth = 0;
        let mut close = open;
        let mut parts = Vec::new();
        let mut part_start = open + 1;
        for (i, c) in lower[open..].char_indices() {
            match c {
                '(' => depth += 1,
                ')' => {
                    depth -= 1;
                    if depth == 0 {
                        close = open + i;
                        break;
                    }
                }
                ',' if depth == 1 => {
                    parts.push(&lower[part_start..open + i]);
                    part_start = open + i + 1;
                }
                _ => {}
            }
        }
        parts.push(&lower[part_start..close]);
        let columns = tables.entry(name).or_default();
        for part in parts {
            let first = part.split_whitespace().next().unwrap_or_default();
            if ![
                "primary",
                "unique",
                "constraint",
                "check",
                "foreign",
                "exclude",
                "",
            ]
            .contains(&first)
            {
                columns.insert(first.trim_matches('"').to_owned());
            }
        }
        at = close;
    }
    // ALTER TABLE [IF EXISTS] t ADD [COLUMN] [IF NOT EXISTS] c ...
    for stmt in lower.split(';') {
        let w = words(stmt);
        if let Some(i) = w
            .windows(2)
            .position(|p| p[0] == "alter" && p[1] == "table")
        {
            let mut j = i + 2;
            if w.get(j).map(String::as_str) == Some("if") {
                j += 2;
            }
            let Some(table) = w.get(j).cloned() else {
                continue;
            };
            let mut k = j + 1;
            while k < w.len() {
                if w[k] == "add" {
                    let mut c = k + 1;
                    if w.get(c).map(String::as_str) == Some("column") {
                        c += 1;
                    }
                    if w.get(c).map(String::as_str) == Some("if") {
                        c += 3;
                    }
                    if let Some(col) = w.get(c).filter(|c| {
                        ![
                            "constraint",
                            "primary",
                            "unique",
                            "foreign",
                            "check",
                            "exclude",
                        ]
                        .contains(&c.as_str())
                    }) {
                        tables.entry(table.clone()).or_default().insert(col.clone());
                    }
                }
                k += 1;
            }
        }
    }
    assert!(
        tables.get("scores").is_some_and(|c| c.contains("ts")),
        "parsing the migrations found no scores(ts): {tables:?}"
    );
    tables
}

#[derive(Debug, Clone, PartialEq)]
enum Tok {
    Ident(String),
    Quoted(String),
    Punct(String),
    Other,
}

const SQL_KEYWORDS: &[&str] = &[
    "select",
    "from",
    "where",
    "and",
    "or",
    "not",
    "is",
    "null",
    "as",
    "join",
    "inner",
    "left",
    "right",
    "outer",
    "full",
    "cross",
    "on",
    "using",
    "group",
    "by",
    "order",
    "asc",
    "desc",
    "nulls",
    "first",
    "last",
    "limit",
    "offset",
    "distinct",
    "union",
    "all",
    "intersect",
    "except",
    "over",
    "partition",
    "rows",
    "range",
    "between",
    "preceding",
    "following",
    "unbounded",
    "current",
    "row",
    "case",
    "when",
    "then",
    "else",
    "end",
    "true",
    "false",
    "in",
    "like",
    "ilike",
    "having",
    "with",
    "exists",
    "any",
    "some",
    "interval",
    "filter",
];

fn sql_tokens(sql: &str) -> Vec<Tok> {
    let chars: Vec<char> = sql.chars().collect();
    let mut out = Vec::new();
    let mut i = 0;
    while i < chars.len() {
        let c = chars[i];
        if c.is_whitespace() {
            i += 1;
        } else if c == '-' && chars.get(i + 1) == Some(&'-') {
            while i < chars.len() && chars[i] != '\n' {
                i += 1;
            }
        } else if c == '\'' {
            i += 1;
            while i < chars.len() {
                if chars[i] == '\'' && chars.get(i + 1) == Some(&'\'') {
                    i += 2;
                } else if chars[i] == '\'' {
                    break;
                } else {
                    i += 1;
                }
            }
            i += 1;
            out.push(Tok::Other);
        } else if c == '"' {
            let start = i + 1;
            i = start;
            while i < chars.len() && chars[i] != '"' {
                i += 1;
            }
            out.push(Tok::Quoted(
                chars[start..i.min(chars.len())].iter().collect(),
            ));
            i += 1;
        } else if c == '$' {
            // Grafana macros ($__timeFilter) and variables ($channel, ${channel}).
            i += 1;
            while i < chars.len() && (is_ident_char(chars[i]) || chars[i] == '{' || chars[i] == '}')
            {
                i += 1;
            }
            out.push(Tok::Other);
        } else if is_ident_start(c) {
            let start = i;
            while i < chars.len() && is_ident_char(chars[i]) {
                i += 1;
            }
            out.push(Tok::Ident(
                chars[start..i]
                    .iter()
                    .collect::<String>()
                    .to_ascii_lowercase(),
            ));
        } else if c.is_ascii_digit() {
            while i < chars.len() && (chars[i].is_ascii_alphanumeric() || chars[i] == '.') {
                i += 1;
            }
            out.push(Tok::Other);
        } else if c == ':' && chars.get(i + 1) == Some(&':') {
            out.push(Tok::Punct("::".into()));
            i += 2;
        } else {
            out.push(Tok::Punct(c.to_string()));
            i += 1;
        }
    }
    out
}

/// Every table after FROM/JOIN must be in the schema, and every identifier
/// that is not a keyword, function, alias or type must be a column of a
/// table the query reads (of the named table where qualified: `f.seq`).
fn check_sql(sql: &str, schema: &BTreeMap<String, BTreeSet<String>>) -> Vec<String> {
    let toks = sql_tokens(sql);
    let ident = |i: usize| match toks.get(i) {
        Some(Tok::Ident(s)) => Some(s.as_str()),
        _ => None,
    };
    let punct = |i: usize, p: &str| matches!(toks.get(i), Some(Tok::Punct(s)) if s == p);
    let is_kw = |s: &str| SQL_KEYWORDS.contains(&s);
    let mut problems = Vec::new();
    let mut tables: BTreeMap<String, String> = BTreeMap::new(); // name or alias -> table
    let mut aliases: BTreeSet<String> = BTreeSet::new();
    let mut skip: BTreeSet<usize> = BTreeSet::new();
    for i in 0..toks.len() {
        if matches!(ident(i), Some("from" | "join")) {
            if let Some(table) = ident(i + 1).filter(|t| !is_kw(t)) {
                skip.insert(i + 1);
                if !schema.contains_key(table) {
                    problems.push(format!("table `{table}` is not created by the migrations"));
                }
                tables.insert(table.to_owned(), table.to_owned());
                let alias_at = if ident(i + 2) == Some("as") {
                    i + 3
                } else {
                    i + 2
                };
                if let Some(alias) = ident(alias_at).filter(|a| !is_kw(a)) {
                    skip.insert(alias_at);
                    tables.insert(alias.to_owned(), table.to_owned());
                }
            }
        }
        if ident(i) == Some("as") {
            match toks.get(i + 1) {
                Some(Tok::Ident(a)) | Some(Tok::Quoted(a)) => {
                    aliases.insert(a.to_ascii_lowercase());
                    skip.insert(i + 1);
                }
                _ => {}
            }
        }
    }
    let known: BTreeMap<&str, &BTreeSet<String>> = tables
        .values()
        .filter_map(|t| schema.get_key_value(t.as_str()))
        .map(|(k, v)| (k.as_str(), v))
        .collect();
    let mut i = 0;
    while i < toks.len() {
        let Some(word) = ident(i) else {
            i += 1;
            continue;
        };
        if skip.contains(&i) || is_kw(word) || punct(i + 1, "(") || (i > 0 && punct(i - 1, "::")) {
            i += 1;
            continue;
        }
        if punct(i + 1, ".") {
            let column = ident(i + 2).unwrap_or("?");
            match tables.get(word).and_then(|t| schema.get(t).map(|c| (t, c))) {
                None => problems.push(format!(
                    "`{word}.{column}`: `{word}` is not a table or table alias of the query"
                )),
                Some((t, cols)) if !cols.contains(column) => {
                    problems.push(format!("column `{column}` is not a column of {t}"))
                }
                Some(_) => {}
            }
            i += 3;
            continue;
        }
        let in_table = known.values().any(|cols| cols.contains(word));
        if !in_table && !aliases.contains(word) {
            problems.push(format!(
                "column `{word}` is not a column of {}",
                known.keys().copied().collect::<Vec<_>>().join(" or ")
            ));
        }
        i += 1;
    }
    if tables.is_empty() {
        problems.push("the query reads no table".into());
    }
    problems
}

#[test]
fn dashboard_sql_uses_existing_tables_and_columns() {
    let schema = schema();
    let dash = Dashboard::load();
    let mut problems = Vec::new();
    let mut read = BTreeSet::new();
    for q in dash.sql() {
        for p in check_sql(&q.text, &schema) {
            problems.push(format!("{}: {p}", q.place));
        }
        for v in variables_used(&q.text) {
            if !dash.variables.contains(&v) {
                problems.push(format!("{}: variable `${v}` is not defined", q.place));
            }
        }
        for tok in sql_tokens(&q.text) {
            if let Tok::Ident(t) = tok {
                if schema.contains_key(&t) {
                    read.insert(t);
                }
            }
        }
    }
    fail_if_any(
        &format!("{DASHBOARD} SQL does not match the schema the migrations create"),
        problems,
    );
    for table in ["scores", "forecasts", "anomaly_events"] {
        assert!(read.contains(table), "{DASHBOARD}: no panel reads {table}");
    }
    assert!(
        dash.variables.contains("channel"),
        "{DASHBOARD}: no $channel variable"
    );
}

#[test]
fn sql_checker_catches_unknown_columns_and_tables() {
    let schema = schema();
    let ok = "SELECT $__timeGroupAlias(s.ts, $__interval), avg(f.horizon[1]) AS forecast_next \
              FROM forecasts AS f JOIN scores AS s ON s.channel = f.channel AND s.seq = f.seq + 1 \
              WHERE f.channel = '$channel' AND $__timeFilter(s.ts) GROUP BY 1 ORDER BY 1";
    assert_eq!(check_sql(ok, &schema), Vec::<String>::new());
    let bad_column = "SELECT ts AS \"time\", value FROM scores WHERE channel = 'x'";
    assert_eq!(
        check_sql(bad_column, &schema),
        ["column `value` is not a column of scores"]
    );
    let bad_qualified = "SELECT f.ts FROM forecasts AS f";
    assert_eq!(
        check_sql(bad_qualified, &schema),
        ["column `ts` is not a column of forecasts"]
    );
    let bad_table = "SELECT channel FROM telemetry";
    assert!(check_sql(bad_table, &schema)[0].contains("table `telemetry`"));
}
