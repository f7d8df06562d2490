//! One thread that owns netlink sockets for as long as a device lives.
//!
//! The [`crate::WireGuard`] trait is synchronous and its callers differ: the agent's data plane
//! calls it inside `tokio::task::block_in_place` but drops devices in async code, and tests call
//! it without any runtime. A nested `block_on` panics in async code, and so does dropping a
//! runtime there. So the netlink conversations run on a thread of their own with a
//! current-thread runtime, and callers hand it jobs and wait for the answer. The thread, its
//! runtime and its two sockets (route and generic netlink) are made once per device and kept
//! until the device is dropped: a status read a second costs one netlink round trip, not a
//! thread, a runtime and two sockets. A thread starts in its creator's network namespace, so the
//! sockets live there too. A socket whose connection ended (an error on it) is opened again
//! before the next job.

use std::future::Future;
use std::pin::Pin;

use tokio::sync::mpsc;
use tokio::task::JoinHandle;

use crate::WgError;

/// The worker's sockets, as handed to a job (both handles are cheap clones of one connection).
#[derive(Clone)]
pub struct Sockets {
    pub route: rtnetlink::Handle,
    pub generic: genetlink::GenetlinkHandle,
}

type Job = Box<dyn FnOnce(Sockets) -> Pin<Box<dyn Future<Output = ()>>> + Send>;

/// The handle to one netlink thread; dropping it ends the thread (after the job in progress).
pub struct NetlinkWorker {
    interface: String,
    jobs: Option<mpsc::UnboundedSender<Job>>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl NetlinkWorker {
    /// Starts the thread and opens its sockets in the caller's network namespace. `interface`
    /// only labels errors.
    pub fn start(interface: &str) -> Result<Self, WgError> {
        let (jobs, mut queue) = mpsc::unbounded_channel::<Job>();
        let (opened, open_result) = std::sync::mpsc::sync_channel(1);
        let label = interface.to_owned();
        let thread = std::thread::Builder::new()
            .name("wg-netlink".to_owned())
            .spawn(move || {
                let runtime = match tokio::runtime::Builder::new_current_thread()
                    .enable_all()
                    .build()
                {
                    Ok(runtime) => runtime,
                    Err(e) => {
                        let _ = opened.send(Err(device(
                            &label,
                            format!("cannot start a netlink runtime: {e}"),
                        )));
                        return;
                    }
                };
                runtime.block_on(async move {
                    let mut connection = match Connection::open(&label) {
                        Ok(connection) => connection,
                        Err(e) => {
                            let _ = opened.send(Err(e));
                            return;
                        }
                    };
                    let _ = opened.send(Ok(()));
                    while let Some(job) = queue.recv().await {
                        if connection.ended() {
                            match Connection::open(&label) {
                                Ok(fresh) => {
                                    tracing::debug!(interface = %label, "netlink connection ended; opened a new one");
                                    connection = fresh;
                                }
                                // The job's own requests fail and say why.
                                Err(e) => tracing::warn!(interface = %label, error = %e, "cannot reopen netlink sockets"),
                            }
                        }
                        job(connection.sockets.clone()).await;
                    }
                });
            })
            .map_err(|e| device(interface, format!("cannot start a netlink thread: {e}")))?;
        let worker = Self {
            interface: interface.to_owned(),
            jobs: Some(jobs),
            thread: Some(thread),
        };
        match open_result.recv() {
            Ok(Ok(())) => Ok(worker),
            Ok(Err(e)) => Err(e),
            Err(_) => Err(device(interface, "the netlink thread ended at start")),
        }
    }

    /// Runs one conversation on the worker's thread and waits for its result.
    pub fn run<T, F, Fut>(&self, body: F) -> Result<T, WgError>
    where
        T: Send + 'static,
        F: FnOnce(Sockets) -> Fut + Send + 'static,
        Fut: Future<Output = Result<T, WgError>> + 'static,
    {
        let (reply, result) = std::sync::mpsc::sync_channel(1);
        let job: Job = Box::new(move |sockets| {
            Box::pin(async move {
                let _ = reply.send(body(sockets).await);
            })
        });
        let stopped = || device(&self.interface, "the netlink thread has stopped");
        self.jobs
            .as_ref()
            .ok_or_else(stopped)?
            .send(job)
            .map_err(|_| stopped())?;
        result.recv().map_err(|_| stopped())?
    }

    /// A one-off conversation on a worker of its own, in the caller's network namespace.
    pub fn once<T, F, Fut>(interface: &str, body: F) -> Result<T, WgError>
    where
        T: Send + 'static,
        F: FnOnce(Sockets) -> Fut + Send + 'static,
        Fut: Future<Output = Result<T, WgError>> + 'static,
    {
        Self::start(interface)?.run(body)
    }
}

impl Drop for NetlinkWorker {
    fn drop(&mut self) {
        // Closing the queue ends the thread's loop once the job in progress is done.
        self.jobs = None;
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
    }
}

/// The two netlink connections, each driven by a task on the worker's runtime.
struct Connection {
    sockets: Sockets,
    tasks: [JoinHandle<()>; 2],
}

impl Connection {
    fn open(interface: &str) -> Result<Self, WgError> {
        let (route_connection, route, _) = rtnetlink::new_connection().map_err(|e| {
            device(
                interface,
                format!("cannot open a route netlink socket: {e}"),
            )
        })?;
        let (generic_connection, generic, _) = genetlink::new_connection().map_err(|e| {
            device(
                interface,
                format!("cannot open a generic netlink socket: {e}"),
            )
        })?;
        Ok(Self {
            sockets: Sockets { route, generic },
            tasks: [
                tokio::spawn(route_connection),
                tokio::spawn(generic_connection),
            ],
        })
    }

    fn ended(&self) -> bool {
        self.tasks.iter().any(JoinHandle::is_finished)
    }
}

pub(crate) fn device(interface: &str, message: impl Into<String>) -> WgError {
    WgError::Device {
        interface: interface.to_owned(),
        message: message.into(),
    }
}
