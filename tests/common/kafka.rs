//! Apache Kafka for the integration tests: a single KRaft node (broker and
//! controller in one process) or a three-node cluster, each node a JVM on
//! free loopback ports with its own log directory, from the jars
//! `scripts/setup.sh` fetched from Maven Central. And the helpers that read
//! topics back and inspect the group's offsets.

use std::{
    collections::BTreeMap,
    fs,
    net::TcpStream,
    path::PathBuf,
    process::{Child, Command, Stdio},
    time::{Duration, Instant},
};

use rdkafka::{
    consumer::{BaseConsumer, Consumer},
    error::KafkaError,
    ClientConfig, Message, Offset, TopicPartitionList,
};

use super::{free_port, repo_root, wait_for};

/// How long a node may take to log `Kafka Server started`: a JVM start and
/// log recovery on a loaded 2-core machine, with other nodes starting too.
const START_DEADLINE: Duration = Duration::from_secs(90);

/// The jars `scripts/setup.sh` installed (`SATWATCH_KAFKA_LIB`, which
/// `scripts/test.sh` exports), else the newest version in the cache.
fn kafka_lib() -> PathBuf {
    if let Ok(lib) = std::env::var("SATWATCH_KAFKA_LIB") {
        return PathBuf::from(lib);
    }
    let cache = std::env::var("SATWATCH_CACHE")
        .map(PathBuf::from)
        .unwrap_or_else(|_| {
            PathBuf::from(std::env::var("HOME").expect("HOME is set")).join(".cache/satwatch")
        });
    let mut versions: Vec<PathBuf> = fs::read_dir(cache.join("kafka"))
        .map(|dir| {
            dir.filter_map(|e| Some(e.ok()?.path().join("lib")))
                .collect()
        })
        .unwrap_or_default();
    versions.sort();
    versions.pop().unwrap_or_else(|| {
        panic!(
            "Apache Kafka's jars are not in {}: run scripts/setup.sh (or set SATWATCH_KAFKA_LIB)",
            cache.join("kafka/<version>/lib").display()
        )
    })
}

fn java() -> String {
    std::env::var("SATWATCH_JAVA").unwrap_or_else(|_| "java".into())
}

/// A random Kafka cluster id: 16 bytes, URL-safe base64 without padding
/// (what `kafka-storage random-uuid` prints), so no JVM start is spent on it.
fn random_cluster_id() -> String {
    use std::hash::{BuildHasher, Hasher};
    let mut bytes = Vec::with_capacity(16);
    for _ in 0..2 {
        let mut h = std::collections::hash_map::RandomState::new().build_hasher();
        h.write_u128(Instant::now().elapsed().as_nanos());
        bytes.extend_from_slice(&h.finish().to_le_bytes());
    }
    // An id that starts with '-' reads as an option to the storage tool:
    // a clear top bit makes the first character a letter.
    bytes[0] &= 0x7f;
    const ALPHABET: &[u8] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_";
    let mut bits = 0u32;
    let mut width = 0;
    let mut id = String::new();
    for b in bytes {
        bits = (bits << 8) | b as u32;
        width += 8;
        while width >= 6 {
            width -= 6;
            id.push(ALPHABET[((bits >> width) & 63) as usize] as char);
        }
    }
    if width > 0 {
        id.push(ALPHABET[((bits << (6 - width)) & 63) as usize] as char);
    }
    id
}

/// One KRaft node: broker and controller in one JVM.
struct Node {
    id: u32,
    port: u16,
    controller_port: u16,
    dir: PathBuf,
    child: Option<Child>,
}

impl Node {
    fn log_path(&self) -> PathBuf {
        self.dir.join("kafka.log")
    }

    fn java(&self, main: &str) -> Command {
        let mut command = Command::new(java());
        let log4j = std::env::var("SATWATCH_KAFKA_LOG4J")
            .map(PathBuf::from)
            .unwrap_or_else(|_| repo_root().join("deploy/kafka-local/log4j2.properties"));
        command
            // Tests start a dozen short-lived brokers on two cores: a small
            // heap, and the C1 compiler alone keeps start-up cheap.
            .args([
                "-Xms256m",
                "-Xmx512m",
                "-XX:+UseSerialGC",
                "-XX:TieredStopAtLevel=1",
            ])
            .arg(format!("-Dlog4j2.configurationFile={}", log4j.display()))
            .arg("-cp")
            .arg(format!("{}/*", kafka_lib().display()))
            .arg(main);
        command
    }

    /// Starts the node's JVM and waits for `Kafka Server started`.
    fn start(&mut self) {
        let log = fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(self.log_path())
            .unwrap();
        let marker_from = log.metadata().map(|m| m.len()).unwrap_or(0) as usize;
        let child = self
            .java("kafka.Kafka")
            .arg(self.dir.join("server.properties"))
            .stdout(log.try_clone().unwrap())
            .stderr(log)
            .spawn()
            .expect("java starts");
        self.child = Some(child);
        let path = self.log_path();
        let started = Instant::now();
        wait_for(
            &format!("Kafka node {} to start (log {})", self.id, path.display()),
            START_DEADLINE,
            || {
                if let Some(Ok(Some(status))) = self.child.as_mut().map(Child::try_wait) {
                    panic!(
                        "Kafka node {} exited with {status} while starting: {}",
                        self.id,
                        fs::read_to_string(&path).unwrap_or_default()
                    );
                }
                let text = fs::read(&path).ok()?;
                let text = String::from_utf8_lossy(text.get(marker_from..)?);
                text.contains("Kafka Server started").then_some(())
            },
        );
        eprintln!(
            "Kafka node {} started in {:.1?}",
            self.id,
            started.elapsed()
        );
        wait_for("the broker port to accept", Duration::from_secs(10), || {
            TcpStream::connect(("127.0.0.1", self.port)).ok()
        });
    }

    fn signal(&mut self, signal: &str, deadline: Duration) {
        if let Some(mut child) = self.child.take() {
            let pid = child.id().to_string();
            let _ = Command::new("kill").args([signal, &pid]).status();
            let end = Instant::now() + deadline;
            while Instant::now() < end {
                if let Ok(Some(_)) = child.try_wait() {
                    return;
                }
                std::thread::sleep(Duration::from_millis(50));
            }
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

/// A Kafka cluster of one or three KRaft nodes in a temporary directory.
///
/// Set as scripts/services.sh sets it, but for `group.min.session.timeout.ms`
/// (1 s, Kafka's default is 6 s): the failover tests give consumers a short
/// session so a killed member's partitions move on in seconds.
pub struct Broker {
    nodes: Vec<Node>,
    _dir: tempfile::TempDir,
}

impl Broker {
    /// One node, replication factor 1 for the internal topics.
    pub fn start() -> Self {
        Self::start_nodes(1)
    }

    /// Three nodes, each broker and controller (a static quorum of three),
    /// replication factor 3 and `min.insync.replicas` 2 by default.
    pub fn start_cluster() -> Self {
        Self::start_nodes(3)
    }

    fn start_nodes(count: u32) -> Self {
        let dir = tempfile::tempdir().expect("temp dir");
        let mut nodes: Vec<Node> = (1..=count)
            .map(|id| Node {
                id,
                port: free_port(),
                controller_port: free_port(),
                dir: dir.path().join(format!("node{id}")),
                child: None,
            })
            .collect();
        let voters: Vec<String> = nodes
            .iter()
            .map(|n| format!("{}@127.0.0.1:{}", n.id, n.controller_port))
            .collect();
        let replication = count.min(3);
        let min_isr = if count >= 3 { 2 } else { 1 };
        let cluster_id = random_cluster_id();
        let mut formats = Vec::new();
        for node in &nodes {
            fs::create_dir_all(&node.dir).unwrap();
            let quorum = if count == 1 {
                format!(
                    "controller.quorum.bootstrap.servers=127.0.0.1:{}",
                    node.controller_port
                )
            } else {
                format!("controller.quorum.voters={}", voters.join(","))
            };
            let properties = format!(
                "process.roles=broker,controller\n\
                 node.id={id}\n\
                 {quorum}\n\
                 listeners=PLAINTEXT://127.0.0.1:{port},CONTROLLER://127.0.0.1:{cport}\n\
                 advertised.listeners=PLAINTEXT://127.0.0.1:{port},CONTROLLER://127.0.0.1:{cport}\n\
                 inter.broker.listener.name=PLAINTEXT\n\
                 controller.listener.names=CONTROLLER\n\
                 listener.security.protocol.map=CONTROLLER:PLAINTEXT,PLAINTEXT:PLAINTEXT\n\
                 log.dirs={logs}\n\
                 default.replication.factor={replication}\n\
                 min.insync.replicas={min_isr}\n\
                 offsets.topic.replication.factor={replication}\n\
                 offsets.topic.num.partitions=3\n\
                 transaction.state.log.replication.factor={replication}\n\
                 transaction.state.log.min.isr={min_isr}\n\
                 transaction.state.log.num.partitions=3\n\
                 share.coordinator.state.topic.replication.factor={replication}\n\
                 share.coordinator.state.topic.min.isr={min_isr}\n\
                 group.initial.rebalance.delay.ms=0\n\
                 group.min.session.timeout.ms=1000\n\
                 auto.create.topics.enable=false\n",
                id = node.id,
                port = node.port,
                cport = node.controller_port,
                logs = node.dir.join("data").display(),
            );
            fs::write(node.dir.join("server.properties"), properties).unwrap();
            let mut format = node.java("kafka.tools.StorageTool");
            format
                .args(["format", "--ignore-formatted", "-t", &cluster_id, "-c"])
                .arg(node.dir.join("server.properties"));
            if count == 1 {
                format.arg("--standalone");
            }
            formats.push(
                format
                    .stdout(Stdio::piped())
                    .stderr(Stdio::piped())
                    .spawn()
                    .expect("java starts"),
            );
        }
        for format in formats {
            let output = format.wait_with_output().unwrap();
            assert!(
                output.status.success(),
                "formatting Kafka storage failed: {}{}",
                String::from_utf8_lossy(&output.stdout),
                String::from_utf8_lossy(&output.stderr)
            );
        }
        // A static quorum needs a majority of its voters up before any node
        // reports started: spawn them all, then wait.
        for node in &mut nodes {
            let log = fs::File::create(node.log_path()).unwrap();
            drop(log);
        }
        std::thread::scope(|s| {
            for node in &mut nodes {
                s.spawn(|| node.start());
            }
        });
        Self { nodes, _dir: dir }
    }

    /// The bootstrap servers: every node.
    pub fn addr(&self) -> String {
        self.nodes
            .iter()
            .map(|n| format!("127.0.0.1:{}", n.port))
            .collect::<Vec<_>>()
            .join(",")
    }

    /// The nodes' ids (1, 2, 3), which are also their broker ids.
    pub fn node_ids(&self) -> Vec<u32> {
        self.nodes.iter().map(|n| n.id).collect()
    }

    fn node(&mut self, id: u32) -> &mut Node {
        self.nodes
            .iter_mut()
            .find(|n| n.id == id)
            .unwrap_or_else(|| panic!("no Kafka node {id}"))
    }

    /// Controlled shutdown of every node (SIGTERM), as an operator stops it.
    pub fn stop(&mut self) {
        for node in &mut self.nodes {
            node.signal("-TERM", Duration::from_secs(60));
        }
    }

    /// Starts every node again on the same ports and storage.
    pub fn resume(&mut self) {
        std::thread::scope(|s| {
            for node in &mut self.nodes {
                if node.child.is_none() {
                    s.spawn(|| node.start());
                }
            }
        });
    }

    /// `kill -9` of one node: a crash, no controlled shutdown.
    pub fn kill_node(&mut self, id: u32) {
        self.node(id).signal("-KILL", Duration::from_secs(10));
    }

    /// Controlled shutdown of one node (SIGTERM).
    pub fn stop_node(&mut self, id: u32) {
        self.node(id).signal("-TERM", Duration::from_secs(60));
    }

    /// Starts a stopped or killed node again, without formatting.
    pub fn resume_node(&mut self, id: u32) {
        self.node(id).start();
    }

    /// How many partitions of `topics` each broker leads now.
    pub fn leader_counts(&self, topics: &[&str]) -> BTreeMap<i32, usize> {
        let consumer: BaseConsumer = ClientConfig::new()
            .set("bootstrap.servers", self.addr())
            .create()
            .unwrap();
        let mut counts = BTreeMap::new();
        for topic in topics {
            let metadata = consumer
                .fetch_metadata(Some(topic), Duration::from_secs(10))
                .unwrap();
            for p in metadata.topics()[0].partitions() {
                *counts.entry(p.leader()).or_default() += 1;
            }
        }
        counts
    }
}

impl Drop for Broker {
    fn drop(&mut self) {
        for node in &mut self.nodes {
            node.signal("-KILL", Duration::from_secs(10));
        }
    }
}

/// One record read back from a topic.
#[derive(Debug, Clone)]
pub struct Record {
    pub key: Option<Vec<u8>>,
    pub payload: Option<Vec<u8>>,
    pub headers: Vec<(String, String)>,
}

/// Reads every committed record of `topic` up to its current end, as a
/// `read_committed` consumer sees them (records of aborted transactions and
/// the transactions' markers are skipped).
pub fn read_topic(broker: &Broker, topic: &str) -> Vec<Record> {
    use rdkafka::message::Headers;
    let consumer: BaseConsumer = ClientConfig::new()
        .set("bootstrap.servers", broker.addr())
        .set("group.id", format!("reader-{}", free_port()))
        .set("enable.auto.commit", "false")
        .set("isolation.level", "read_committed")
        .set("enable.partition.eof", "true")
        .create()
        .unwrap();
    let metadata = consumer
        .fetch_metadata(Some(topic), Duration::from_secs(10))
        .unwrap();
    let mut assignment = TopicPartitionList::new();
    let mut remaining = Vec::new();
    for p in metadata.topics()[0].partitions() {
        assignment
            .add_partition_offset(topic, p.id(), Offset::Beginning)
            .unwrap();
        remaining.push(p.id());
    }
    let mut records = Vec::new();
    consumer.assign(&assignment).unwrap();
    let deadline = Instant::now() + Duration::from_secs(60);
    while !remaining.is_empty() {
        assert!(
            Instant::now() < deadline,
            "timed out reading {topic}: still waiting on partitions {remaining:?}"
        );
        let message = match consumer.poll(Duration::from_millis(200)) {
            None => continue,
            Some(Err(KafkaError::PartitionEOF(p))) => {
                remaining.retain(|r| *r != p);
                continue;
            }
            Some(Err(err)) => panic!("reading {topic}: {err}"),
            Some(Ok(message)) => message,
        };
        let headers = message
            .headers()
            .map(|h| {
                h.iter()
                    .map(|header| {
                        (
                            header.key.to_owned(),
                            String::from_utf8_lossy(header.value.unwrap_or_default()).into_owned(),
                        )
                    })
                    .collect()
            })
            .unwrap_or_default();
        records.push(Record {
            key: message.key().map(<[u8]>::to_vec),
            payload: message.payload().map(<[u8]>::to_vec),
            headers,
        });
    }
    records
}

/// Publishes one raw record.
pub fn produce(broker: &Broker, topic: &str, key: &[u8], payload: &[u8]) {
    use rdkafka::producer::{BaseProducer, BaseRecord, Producer};
    let producer: BaseProducer = ClientConfig::new()
        .set("bootstrap.servers", broker.addr())
        .set("message.max.bytes", "4194304")
        .create()
        .unwrap();
    producer
        .send(BaseRecord::to(topic).key(key).payload(payload))
        .map_err(|(e, _)| e)
        .unwrap();
    producer.flush(Duration::from_secs(10)).unwrap();
}

/// Waits until group `group` has committed every telemetry topic up to its
/// end. With exactly-once delivery this, not the scores table, says a run is
/// settled: rows reach PostgreSQL before their transaction, and after a
/// fenced producer the group processes again from the committed offsets
/// what it had already written.
pub fn wait_for_commits(broker: &Broker, group: &str, deadline: Duration) {
    let topics: Vec<String> = ["eps", "acs", "fsw", "tcs", "data", "ss", "ps"]
        .iter()
        .map(|s| format!("telemetry.{s}"))
        .collect();
    let topics: Vec<&str> = topics.iter().map(String::as_str).collect();
    wait_for(
        &format!("group {group} to commit every telemetry record"),
        deadline,
        || {
            committed_vs_end(broker, group, &topics)
                .iter()
                .all(|(_, _, committed, end)| *end == 0 || committed == end)
                .then_some(())
        },
    );
}

/// (topic, partition, committed offset, high watermark) for every partition
/// of `topics`.
pub fn committed_vs_end(
    broker: &Broker,
    group: &str,
    topics: &[&str],
) -> Vec<(String, i32, i64, i64)> {
    let consumer: BaseConsumer = ClientConfig::new()
        .set("bootstrap.servers", broker.addr())
        .set("group.id", group)
        .set("isolation.level", "read_committed")
        .create()
        .unwrap();
    let mut list = TopicPartitionList::new();
    let mut ends = Vec::new();
    for topic in topics {
        let metadata = consumer
            .fetch_metadata(Some(topic), Duration::from_secs(10))
            .unwrap();
        for p in metadata.topics()[0].partitions() {
            list.add_partition(topic, p.id());
            let (_, high) = consumer
                .fetch_watermarks(topic, p.id(), Duration::from_secs(10))
                .unwrap();
            ends.push(((*topic).to_owned(), p.id(), high));
        }
    }
    let committed = consumer
        .committed_offsets(list, Duration::from_secs(10))
        .unwrap();
    ends.into_iter()
        .map(|(topic, partition, high)| {
            let offset = match committed
                .find_partition(&topic, partition)
                .map(|e| e.offset())
            {
                Some(Offset::Offset(o)) => o,
                _ => -1,
            };
            (topic, partition, offset, high)
        })
        .collect()
}
