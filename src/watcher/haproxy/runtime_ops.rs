//! The runtime API's side of a runtime plan: one membership change (`RuntimeOp`) and
//! the admin-socket commands that carry it out, each with the answer HAProxy gives
//! when it worked. Pure: `runtime_plan` decides the ops, `runtime_api` sends them.

/// One membership change inside an existing backend.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum RuntimeOp {
    /// `add server <backend>/<server> <addr> <args…>`, then enable checks and traffic.
    Add {
        backend: String,
        server: String,
        addr: String,
        /// Effective arguments: default-server ones first, `init-addr` dropped.
        args: Vec<String>,
        check: bool,
        agent: bool,
        /// False when the line says `disabled`: the server stays in maintenance.
        enable: bool,
        /// The backend hands out dynamic cookies (`cookie … dynamic`): `add server`
        /// leaves the new server without one until `enable dynamic-cookie backend`
        /// computes them again (HAProxy 2.6, tried here: the cookie was empty).
        dynamic_cookie: bool,
    },
    /// Maintenance, then `del server` once its requests are done.
    Remove { backend: String, server: String },
    /// `set server <backend>/<server> weight <n>`.
    Weight {
        backend: String,
        server: String,
        weight: String,
    },
    /// `set server <backend>/<server> state <state>`: in or out of rotation.
    State {
        backend: String,
        server: String,
        state: AdminState,
    },
}

/// The admin states a server line's `disabled` maps to.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum AdminState {
    /// Back in rotation.
    Ready,
    /// No new connection, persistent ones included.
    Maint,
    /// No new connection but for clients that persist on it.
    Drain,
}

impl AdminState {
    pub(crate) fn as_str(self) -> &'static str {
        match self {
            AdminState::Ready => "ready",
            AdminState::Maint => "maint",
            AdminState::Drain => "drain",
        }
    }
}

/// One admin-socket command and the answer that means it worked (most commands answer
/// nothing on success and a sentence on failure).
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Command {
    pub(crate) text: String,
    pub(crate) expect: &'static str,
}

impl Command {
    fn new(text: String, expect: &'static str) -> Command {
        Command { text, expect }
    }
}

/// `del server`'s answer when the server is gone.
pub(crate) const DELETED: &str = "Server deleted.";
/// `add server`'s answer when the server exists.
pub(crate) const REGISTERED: &str = "New server registered.";

impl RuntimeOp {
    /// The commands it is, in the order `runtime_api` sends them: the one text of each
    /// command, which the dry run prints and the runtime API receives.
    pub(crate) fn commands(&self) -> Vec<Command> {
        match self {
            RuntimeOp::Add {
                backend,
                server,
                addr,
                args,
                check,
                agent,
                enable,
                dynamic_cookie,
            } => {
                let id = format!("{backend}/{server}");
                let mut add = format!("add server {id} {addr}");
                for a in args {
                    add.push(' ');
                    add.push_str(a);
                }
                let mut out = vec![Command::new(add, REGISTERED)];
                if *dynamic_cookie {
                    out.push(Command::new(
                        format!("enable dynamic-cookie backend {backend}"),
                        "",
                    ));
                }
                // A dynamic server starts in maintenance with checks off.
                for (on, what) in [(*check, "health"), (*agent, "agent"), (*enable, "server")] {
                    if on {
                        out.push(Command::new(format!("enable {what} {id}"), ""));
                    }
                }
                out
            }
            RuntimeOp::Remove { backend, server } => vec![
                Command::new(format!("set server {backend}/{server} state maint"), ""),
                Command::new(format!("del server {backend}/{server}"), DELETED),
            ],
            RuntimeOp::Weight {
                backend,
                server,
                weight,
            } => vec![Command::new(
                format!("set server {backend}/{server} weight {weight}"),
                "",
            )],
            RuntimeOp::State {
                backend,
                server,
                state,
            } => vec![Command::new(
                format!("set server {backend}/{server} state {}", state.as_str()),
                "",
            )],
        }
    }

    /// For a `Remove` whose `del server` found connections still pooled: the commands
    /// that empty the idle pool again before the next `del` (see `runtime_api`).
    pub(crate) fn repool(&self) -> Vec<Command> {
        match self {
            RuntimeOp::Remove { backend, server } => ["drain", "maint"]
                .map(|s| Command::new(format!("set server {backend}/{server} state {s}"), ""))
                .into(),
            _ => Vec::new(),
        }
    }

    /// What the dry run prints: the commands as an operator would type them.
    pub(crate) fn describe(&self) -> String {
        let join = |c: Vec<Command>| c.into_iter().map(|c| c.text).collect::<Vec<_>>().join("; ");
        let mut out = join(self.commands());
        let repool = self.repool();
        if !repool.is_empty() {
            out += &format!(
                " (while it still has connections: {}; del again)",
                join(repool)
            );
        }
        if let RuntimeOp::Add { enable: false, .. } = self {
            out += " (stays in maintenance)";
        }
        out
    }
}
