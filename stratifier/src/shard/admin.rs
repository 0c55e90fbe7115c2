//! What the admin socket asks of a shard (ckpool's `clients`, `dropclient`, `reconnclient`,
//! `dropall` and `reconnect`): a bounded list of its clients, and dropping or reconnecting one
//! client or all of them. None of it is on a share or job path.

use common::ConnId;
use common::stratum::write;
use serde::Serialize;
use tracing::info;

use super::Shard;
use crate::{ClientId, Out};

/// One client as the admin `clients` and `getclient` queries show it.
#[derive(Clone, Debug, Serialize, PartialEq)]
pub struct ClientInfo {
    /// The admin id of the client: its connection's id as a number (what `dropclient=ID`,
    /// `reconnclient=ID` and `getclient` take).
    pub id: u64,
    /// For a miner behind a passthrough: the passthrough's own id for it (`id` is then the
    /// passthrough link's connection).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub subid: Option<u64>,
    /// The peer's address.
    pub address: String,
    /// Authorised user and worker (`None` before `mining.authorize`).
    pub user: Option<String>,
    /// The full worker name.
    pub worker: Option<String>,
    /// The user agent from `mining.subscribe`.
    pub useragent: String,
    /// Current share difficulty.
    pub diff: f64,
    /// Whether it has subscribed.
    pub subscribed: bool,
    /// Its session id (what it may resume with).
    pub session_id: u32,
}

/// Where `client.reconnect` sends a miner: nowhere (empty params, the same server) or another
/// server.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct ReconnectTo {
    /// Host and port; `None` for `client.reconnect` with empty params.
    pub to: Option<(String, u16)>,
}

impl ReconnectTo {
    fn write(&self, buf: &mut Vec<u8>) {
        match &self.to {
            None => write::reconnect(buf),
            // `["host",port]`: the stratum method's first two params, no wait.
            Some((host, port)) => {
                let line = serde_json::json!({
                    "id": null,
                    "method": "client.reconnect",
                    "params": [host, port],
                });
                buf.extend_from_slice(line.to_string().as_bytes());
                buf.push(b'\n');
            }
        }
    }
}

impl Shard {
    /// Up to `max` of this shard's clients (direct ones first, then sub-clients), and how many
    /// it has in all. With `only`, just that client (direct) if this shard has it.
    pub fn client_infos(&mut self, max: usize, only: Option<ConnId>) -> (usize, Vec<ClientInfo>) {
        let mut list = Vec::new();
        let mut total = 0;
        self.st.sessions.for_each_mut(|client, s| {
            let (conn, subid) = match client {
                ClientId::Direct(c) => (c, None),
                ClientId::Sub(c, r) => (c, Some(r)),
            };
            if only.is_some_and(|o| o != conn || subid.is_some()) {
                return;
            }
            total += 1;
            if list.len() >= max {
                return;
            }
            list.push(ClientInfo {
                id: conn.0,
                subid,
                address: s.peer.addr().to_string(),
                user: s.auth.as_ref().map(|a| a.user.to_string()),
                worker: s.auth.as_ref().map(super::Auth::worker),
                useragent: s.agent.to_string(),
                diff: s.diff().to_f64(),
                subscribed: s.subscribed,
                session_id: s.session_id,
            });
        });
        (total, list)
    }

    /// `dropclient=ID` (`reconnect` `None`) or `reconnclient=ID`: closes the direct client on
    /// connection `conn`, after sending it `client.reconnect` when asked. False when this shard
    /// has no such client.
    pub fn drop_client(
        &mut self,
        conn: ConnId,
        reconnect: Option<&ReconnectTo>,
        out: &mut impl Out,
    ) -> bool {
        let client = ClientId::Direct(conn);
        let Some(s) = self.st.sessions.get(client) else {
            return false;
        };
        info!(%client, peer = %s.peer.addr(), reconnect = reconnect.is_some(), "admin: dropping client");
        if let Some(r) = reconnect {
            let mut buf = Vec::with_capacity(64);
            r.write(&mut buf);
            out.send(client, buf);
        }
        out.close(client);
        true
    }

    /// `dropall` (`reconnect` `None`) or `reconnect[:url,port]`: every client of this shard is
    /// sent `client.reconnect` when asked, then closed. Returns how many.
    pub fn drop_all(&mut self, reconnect: Option<&ReconnectTo>, out: &mut impl Out) -> usize {
        let mut line = Vec::new();
        if let Some(r) = reconnect {
            r.write(&mut line);
        }
        let mut n = 0;
        self.st.sessions.for_each_mut(|client, _| {
            if !line.is_empty() {
                out.send(client, line.clone());
            }
            out.close(client);
            n += 1;
        });
        n
    }
}
