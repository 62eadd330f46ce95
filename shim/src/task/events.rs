//! Task events to containerd: `containerd.services.events.ttrpc.v1.Events/
//! Forward` on `TTRPC_ADDRESS`, one envelope (namespace, topic, `Any`) per
//! event.
//!
//! Publishing only queues; one thread forwards in order and reconnects
//! (containerd may restart while containers run), so no request handler
//! ever blocks on containerd.

use std::sync::mpsc;
use std::time::{Duration, SystemTime};

use containerd_shim_protos::events::task as ev;
use containerd_shim_protos::shim::event::Envelope;
use containerd_shim_protos::shim::events::ForwardRequest;
use containerd_shim_protos::topics;
use containerd_shim_protos::EventsClient;
use protobuf::well_known_types::any::Any;
use protobuf::well_known_types::timestamp::Timestamp;
use protobuf::Message;

/// How long one Forward may take.
const FORWARD_TIMEOUT: Duration = Duration::from_secs(5);
/// How long an event is retried (containerd restarting) before it is dropped.
const RETRY_FOR: Duration = Duration::from_secs(120);
/// How long the connection to containerd stays open with no event to send.
const IDLE_DISCONNECT: Duration = Duration::from_secs(1);

/// A task event.
#[derive(Debug, Clone)]
pub enum Event {
    /// `/tasks/create`.
    Create(ev::TaskCreate),
    /// `/tasks/start`.
    Start(ev::TaskStart),
    /// `/tasks/exit`.
    Exit(ev::TaskExit),
    /// `/tasks/delete`.
    Delete(ev::TaskDelete),
    /// `/tasks/exec-added`.
    ExecAdded(ev::TaskExecAdded),
    /// `/tasks/exec-started`.
    ExecStarted(ev::TaskExecStarted),
    /// `/tasks/paused`.
    Paused(ev::TaskPaused),
    /// `/tasks/resumed`.
    Resumed(ev::TaskResumed),
    /// `/tasks/oom`.
    Oom(ev::TaskOOM),
}

/// containerd's `typeurl` name for a message: its full protobuf name, no
/// `type.googleapis.com/` prefix. Spelled out rather than read from
/// `MessageFull::descriptor()`, which builds the protobuf reflection tables
/// of the whole events file on first use: heap the shim would keep for its
/// whole life (the tests check the names against the descriptors).
fn pack<M: Message>(type_url: &str, msg: &M) -> Any {
    Any {
        type_url: type_url.to_owned(),
        value: msg.write_to_bytes().unwrap_or_default(),
        ..Default::default()
    }
}

impl Event {
    /// The topic and the packed event.
    pub fn topic_and_any(&self) -> (&'static str, Any) {
        match self {
            Self::Create(e) => (topics::TASK_CREATE_EVENT_TOPIC, pack(TYPE_CREATE, e)),
            Self::Start(e) => (topics::TASK_START_EVENT_TOPIC, pack(TYPE_START, e)),
            Self::Exit(e) => (topics::TASK_EXIT_EVENT_TOPIC, pack(TYPE_EXIT, e)),
            Self::Delete(e) => (topics::TASK_DELETE_EVENT_TOPIC, pack(TYPE_DELETE, e)),
            Self::ExecAdded(e) => (
                topics::TASK_EXEC_ADDED_EVENT_TOPIC,
                pack(TYPE_EXEC_ADDED, e),
            ),
            Self::ExecStarted(e) => (
                topics::TASK_EXEC_STARTED_EVENT_TOPIC,
                pack(TYPE_EXEC_STARTED, e),
            ),
            Self::Paused(e) => (topics::TASK_PAUSED_EVENT_TOPIC, pack(TYPE_PAUSED, e)),
            Self::Resumed(e) => (topics::TASK_RESUMED_EVENT_TOPIC, pack(TYPE_RESUMED, e)),
            Self::Oom(e) => (topics::TASK_OOM_EVENT_TOPIC, pack(TYPE_OOM, e)),
        }
    }
}

const TYPE_CREATE: &str = "containerd.events.TaskCreate";
const TYPE_START: &str = "containerd.events.TaskStart";
const TYPE_EXIT: &str = "containerd.events.TaskExit";
const TYPE_DELETE: &str = "containerd.events.TaskDelete";
const TYPE_EXEC_ADDED: &str = "containerd.events.TaskExecAdded";
const TYPE_EXEC_STARTED: &str = "containerd.events.TaskExecStarted";
const TYPE_PAUSED: &str = "containerd.events.TaskPaused";
const TYPE_RESUMED: &str = "containerd.events.TaskResumed";
const TYPE_OOM: &str = "containerd.events.TaskOOM";

/// A protobuf timestamp of `t`.
pub fn timestamp(t: SystemTime) -> Timestamp {
    let d = t.duration_since(SystemTime::UNIX_EPOCH).unwrap_or_default();
    Timestamp {
        seconds: d.as_secs() as i64,
        nanos: d.subsec_nanos() as i32,
        ..Default::default()
    }
}

/// A protobuf timestamp of unix milliseconds.
pub fn timestamp_ms(ms: u64) -> Timestamp {
    timestamp(SystemTime::UNIX_EPOCH + Duration::from_millis(ms))
}

/// Queues events for the forwarding thread.
#[derive(Debug, Clone)]
pub struct Publisher {
    tx: Option<mpsc::Sender<(Timestamp, Event)>>,
}

impl Publisher {
    /// Starts the forwarding thread for `ttrpc_address` (a socket path or
    /// `unix://` address) and `namespace`. An empty address discards events.
    pub fn start(ttrpc_address: &str, namespace: &str) -> Self {
        if ttrpc_address.is_empty() {
            return Self { tx: None };
        }
        let address = if ttrpc_address.contains("://") {
            ttrpc_address.to_owned()
        } else {
            format!("unix://{ttrpc_address}")
        };
        let namespace = namespace.to_owned();
        let (tx, rx) = mpsc::channel();
        let spawned = std::thread::Builder::new()
            .name("events".into())
            .stack_size(crate::task::THREAD_STACK_SIZE)
            .spawn(move || forward_loop(&address, &namespace, rx));
        match spawned {
            Ok(_) => Self { tx: Some(tx) },
            Err(err) => {
                log::error!("cannot start the events thread: {err}");
                Self { tx: None }
            }
        }
    }

    /// A publisher that drops every event (tests, `delete`).
    pub fn discard() -> Self {
        Self { tx: None }
    }

    /// A publisher whose events the returned receiver gets, in order.
    #[cfg(any(test, feature = "test-utils"))]
    pub fn capture() -> (Self, mpsc::Receiver<(Timestamp, Event)>) {
        let (tx, rx) = mpsc::channel();
        (Self { tx: Some(tx) }, rx)
    }

    /// Queues `event`, stamped now.
    pub fn publish(&self, event: Event) {
        log::debug!("event {:?}", event.topic_and_any().0);
        if let Some(tx) = &self.tx {
            let _ = tx.send((timestamp(SystemTime::now()), event));
        }
    }
}

fn forward_loop(address: &str, namespace: &str, rx: mpsc::Receiver<(Timestamp, Event)>) {
    let mut client: Option<EventsClient> = None;
    loop {
        // An idle connection costs two ttrpc client threads for as long as
        // the container sleeps: drop it, reconnect on the next event.
        let next = if client.is_some() {
            match rx.recv_timeout(IDLE_DISCONNECT) {
                Ok(next) => next,
                Err(mpsc::RecvTimeoutError::Timeout) => {
                    client = None;
                    continue;
                }
                Err(mpsc::RecvTimeoutError::Disconnected) => return,
            }
        } else {
            match rx.recv() {
                Ok(next) => next,
                Err(_) => return,
            }
        };
        let (stamp, event) = next;
        let (topic, any) = event.topic_and_any();
        let req = ForwardRequest {
            envelope: protobuf::MessageField::some(Envelope {
                timestamp: protobuf::MessageField::some(stamp),
                namespace: namespace.to_owned(),
                topic: topic.to_owned(),
                event: protobuf::MessageField::some(any),
                ..Default::default()
            }),
            ..Default::default()
        };
        let first = std::time::Instant::now();
        let mut delay = Duration::from_millis(10);
        loop {
            if client.is_none() {
                client = ttrpc::Client::connect(address).ok().map(EventsClient::new);
            }
            let result = match &client {
                Some(c) => c
                    .forward(ttrpc::context::with_duration(FORWARD_TIMEOUT), &req)
                    .map(|_| ()),
                None => Err(ttrpc::Error::Others(format!("cannot connect to {address}"))),
            };
            match result {
                Ok(()) => break,
                Err(err) => {
                    client = None;
                    if first.elapsed() > RETRY_FOR {
                        log::error!("dropping event {topic}: {err:?}");
                        break;
                    }
                    log::debug!("cannot forward {topic} yet: {err:?}");
                    std::thread::sleep(delay);
                    delay = (delay * 2).min(Duration::from_secs(1));
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use protobuf::MessageFull;

    use super::*;

    #[test]
    fn events_are_packed_with_containerd_type_names() {
        let exit = ev::TaskExit {
            container_id: "c".into(),
            id: "c".into(),
            pid: 7,
            exit_status: 3,
            ..Default::default()
        };
        let (topic, any) = Event::Exit(exit.clone()).topic_and_any();
        assert_eq!(topic, "/tasks/exit");
        assert_eq!(any.type_url, "containerd.events.TaskExit");
        assert_eq!(ev::TaskExit::parse_from_bytes(&any.value).unwrap(), exit);
        let (topic, any) = Event::Oom(ev::TaskOOM::default()).topic_and_any();
        assert_eq!(topic, "/tasks/oom");
        assert_eq!(any.type_url, "containerd.events.TaskOOM");
        let (topic, _) = Event::ExecStarted(Default::default()).topic_and_any();
        assert_eq!(topic, "/tasks/exec-started");
    }

    #[test]
    fn type_names_match_the_protobuf_descriptors() {
        fn name<M: MessageFull>() -> String {
            M::descriptor().full_name().to_owned()
        }
        let events = [
            (Event::Create(Default::default()), name::<ev::TaskCreate>()),
            (Event::Start(Default::default()), name::<ev::TaskStart>()),
            (Event::Exit(Default::default()), name::<ev::TaskExit>()),
            (Event::Delete(Default::default()), name::<ev::TaskDelete>()),
            (
                Event::ExecAdded(Default::default()),
                name::<ev::TaskExecAdded>(),
            ),
            (
                Event::ExecStarted(Default::default()),
                name::<ev::TaskExecStarted>(),
            ),
            (Event::Paused(Default::default()), name::<ev::TaskPaused>()),
            (
                Event::Resumed(Default::default()),
                name::<ev::TaskResumed>(),
            ),
            (Event::Oom(Default::default()), name::<ev::TaskOOM>()),
        ];
        for (event, full_name) in events {
            assert_eq!(event.topic_and_any().1.type_url, full_name);
        }
    }

    #[test]
    fn timestamps() {
        let t = timestamp_ms(1_500);
        assert_eq!((t.seconds, t.nanos), (1, 500_000_000));
    }
}
