//! ckpool's passthrough framing against every line of the captured ckpool 0.9.9 passthrough and
//! node links: each line decodes to what it is and encodes back to the same bytes.
#![allow(missing_docs, reason = "tests")]
#![allow(clippy::unwrap_used, clippy::panic, reason = "tests")]

use ckpool_common::stratum::Parser;
use ckpool_common::stratum::passthrough::{self, FromDownstream, FromUpstream, HANDSHAKE_OK, Role};
use proptest::prelude::*;

struct Rec {
    to_pool: bool,
    line: String,
}

fn capture(text: &str) -> Vec<Rec> {
    text.lines()
        .map(|l| {
            let v: serde_json::Value = serde_json::from_str(l).unwrap();
            Rec {
                to_pool: v["dir"] == "to_pool",
                line: v["line"].as_str().unwrap().to_owned(),
            }
        })
        .collect()
}

const PASSTHROUGH: &str = include_str!("data/ckpool-0.9.9-passthrough-link.jsonl");
const NODE: &str = include_str!("data/ckpool-0.9.9-node-link.jsonl");

#[derive(Default, Debug)]
struct Tally {
    handshakes: usize,
    handshake_ok: usize,
    terms: usize,
    miner_lines: usize,
    client_lines: usize,
    link_lines: usize,
}

fn replay(text: &str, role: Role) -> Tally {
    let mut t = Tally::default();
    let mut parser = Parser::new();
    for rec in capture(text) {
        let line = rec.line.as_bytes();
        let mut stripped = Vec::new();
        if rec.to_pool {
            match passthrough::decode_downstream(line, &mut stripped) {
                FromDownstream::Handshake {
                    role: r,
                    agent,
                    multicast,
                } => {
                    assert_eq!(r, role);
                    assert!(!multicast, "ckpool does not ask for multicast");
                    assert_eq!(agent, Some("ckpool\\/0.9.9"));
                    let mut out = Vec::new();
                    passthrough::handshake(&mut out, role, "ckpool/0.9.9");
                    assert_eq!(out, format!("{}\n", rec.line).into_bytes());
                    t.handshakes += 1;
                }
                FromDownstream::Term { client_id } => {
                    let mut out = Vec::new();
                    passthrough::term(&mut out, client_id, "127.0.0.1", 0);
                    assert_eq!(out, format!("{}\n", rec.line).into_bytes());
                    t.terms += 1;
                }
                FromDownstream::Miner {
                    client_id,
                    address,
                    server,
                } => {
                    // What the miner sent is a stratum request without the routing members.
                    let text = String::from_utf8(stripped.clone()).unwrap();
                    assert!(!text.contains("client_id") && !text.contains("\"address\""));
                    let req = parser.parse(stripped.trim_ascii()).unwrap();
                    assert!(req.method_name().is_some_and(|m| m.starts_with("mining.")));
                    let mut out = Vec::new();
                    passthrough::encode_miner_line(
                        &mut out,
                        &stripped,
                        client_id,
                        address.unwrap(),
                        server.unwrap(),
                    )
                    .unwrap();
                    assert_eq!(String::from_utf8(out).unwrap(), format!("{}\n", rec.line));
                    t.miner_lines += 1;
                }
                FromDownstream::Invalid => panic!("invalid: {}", rec.line),
            }
        } else {
            match passthrough::decode_upstream(line, &mut stripped) {
                FromUpstream::HandshakeOk => {
                    assert_eq!(format!("{}\n", rec.line).as_bytes(), HANDSHAKE_OK);
                    t.handshake_ok += 1;
                }
                FromUpstream::Client {
                    client_id,
                    node_method,
                } => {
                    let text = String::from_utf8(stripped.clone()).unwrap();
                    assert!(!text.contains("client_id") && !text.contains("node.method"));
                    // The miner gets valid stratum JSON.
                    let v: serde_json::Value = serde_json::from_str(&text).unwrap();
                    assert!(v.is_object());
                    let mut out = Vec::new();
                    passthrough::encode_for_client(
                        &mut out,
                        &stripped,
                        node_method.unwrap(),
                        client_id,
                    )
                    .unwrap();
                    assert_eq!(String::from_utf8(out).unwrap(), format!("{}\n", rec.line));
                    t.client_lines += 1;
                }
                FromUpstream::Link { node_method } => {
                    assert!(stripped.is_empty());
                    assert!(matches!(node_method, Some("workinfo" | "transactions")));
                    t.link_lines += 1;
                }
                FromUpstream::Clients { .. } => panic!("ckpool sent a multicast: {}", rec.line),
                FromUpstream::Text(raw) => panic!("text: {}", String::from_utf8_lossy(raw)),
            }
        }
    }
    t
}

#[test]
fn replays_the_passthrough_link() {
    let t = replay(PASSTHROUGH, Role::Passthrough);
    assert_eq!((t.handshakes, t.handshake_ok, t.terms), (1, 1, 3), "{t:?}");
    assert_eq!(
        t.handshakes + t.handshake_ok + t.terms + t.miner_lines + t.client_lines + t.link_lines,
        PASSTHROUGH.lines().count()
    );
    assert!(t.miner_lines >= 20 && t.client_lines >= 20, "{t:?}");
    assert_eq!(t.link_lines, 0);
}

#[test]
fn replays_the_node_link() {
    let t = replay(NODE, Role::Node);
    assert_eq!((t.handshakes, t.handshake_ok, t.terms), (1, 1, 1), "{t:?}");
    assert_eq!(t.link_lines, 4, "{t:?}");
    assert_eq!(
        t.handshakes + t.handshake_ok + t.terms + t.miner_lines + t.client_lines + t.link_lines,
        NODE.lines().count()
    );
}

/// The exact bytes a miner gets for one captured upstream line.
#[test]
fn a_share_result_as_the_miner_gets_it() {
    let mut out = Vec::new();
    let line = br#"{"result":true,"error":null,"id":4,"node.method":"share.result","client_id":3}"#;
    assert_eq!(
        passthrough::decode_upstream(line, &mut out),
        FromUpstream::Client {
            client_id: 3,
            node_method: Some("share.result")
        }
    );
    assert_eq!(out, b"{\"result\":true,\"error\":null,\"id\":4}\n");
    let mut out = Vec::new();
    let miner =
        br#"{"params": ["capture.cpu", "6b1242ec00000001"], "id": 4, "method": "mining.submit"}"#;
    passthrough::encode_miner_line(&mut out, miner, 3, "10.0.0.7", 1).unwrap();
    assert_eq!(
        String::from_utf8(out).unwrap(),
        "{\"params\":[\"capture.cpu\",\"6b1242ec00000001\"],\"id\":4,\"method\":\"mining.submit\",\"client_id\":3,\"address\":\"10.0.0.7\",\"server\":1}\n"
    );
}

/// A miner cannot route its line elsewhere: its own routing members are dropped.
#[test]
fn miner_supplied_routing_is_dropped() {
    let mut out = Vec::new();
    let forged = br#"{"id":1,"client_id":99,"method":"mining.submit","address":"1.2.3.4","server":7,"params":[]}"#;
    passthrough::encode_miner_line(&mut out, forged, 5, "127.0.0.1", 0).unwrap();
    let mut back = Vec::new();
    assert_eq!(
        passthrough::decode_downstream(out.trim_ascii(), &mut back),
        FromDownstream::Miner {
            client_id: 5,
            address: Some("127.0.0.1"),
            server: Some(0)
        }
    );
    assert_eq!(
        back,
        b"{\"id\":1,\"method\":\"mining.submit\",\"params\":[]}\n"
    );
    let mut out = Vec::new();
    passthrough::encode_miner_line(&mut out, b"{}", 1, "::1", 2).unwrap();
    assert_eq!(out, b"{\"client_id\":1,\"address\":\"::1\",\"server\":2}\n");
}

#[test]
fn raw_lines_are_data() {
    let mut out = Vec::new();
    for (line, drop) in [
        (&b"dropclient=12"[..], Some(12)),
        (b"dropclient=", None),
        (b"dropclient=1x", None),
        (b"dropclient=99999999999999999999", None),
        (b"reject", None),
        (b"accept", None),
        (b"[1,2]", None),
        (b"{\"a\":1", None),
        (b"", None),
    ] {
        let got = passthrough::decode_upstream(line, &mut out);
        assert_eq!(got, FromUpstream::Text(line));
        assert_eq!(got.dropclient(), drop, "{}", String::from_utf8_lossy(line));
    }
    assert!(out.is_empty());
    assert_eq!(
        passthrough::decode_downstream(b"dropclient=1", &mut out),
        FromDownstream::Invalid
    );
    assert_eq!(
        passthrough::decode_downstream(br#"{"id":1,"method":"mining.submit"}"#, &mut out),
        FromDownstream::Invalid
    );
    assert!(passthrough::encode_miner_line(&mut out, b"not json", 1, "x", 0).is_err());
    assert!(passthrough::encode_for_client(&mut out, b"[true]", "x", 1).is_err());
    assert!(out.is_empty());
    // A result of true with an id is a reply, not the handshake's answer.
    assert_eq!(
        passthrough::decode_upstream(br#"{"result":true,"id":1}"#, &mut out),
        FromUpstream::Link { node_method: None }
    );
}

/// Arbitrary JSON objects as miners might send them.
fn miner_object() -> impl Strategy<Value = serde_json::Value> {
    let leaf = prop_oneof![
        any::<i64>().prop_map(serde_json::Value::from),
        any::<bool>().prop_map(serde_json::Value::from),
        "\\PC{0,12}".prop_map(serde_json::Value::from),
        Just(serde_json::Value::Null),
        (-1e9f64..1e9).prop_map(serde_json::Value::from),
    ];
    let value = leaf.prop_recursive(3, 16, 4, |inner| {
        prop_oneof![
            prop::collection::vec(inner.clone(), 0..4).prop_map(serde_json::Value::from),
            prop::collection::btree_map("[a-z_.]{1,6}", inner, 0..4)
                .prop_map(|m| serde_json::Value::Object(m.into_iter().collect())),
        ]
    });
    prop::collection::btree_map(
        prop_oneof![
            "[a-z_.-]{1,8}",
            Just("client_id".to_owned()),
            Just("address".to_owned())
        ],
        value,
        0..6,
    )
    .prop_map(|m| serde_json::Value::Object(m.into_iter().collect()))
}

proptest! {
    /// Miner line → upstream → back: the same JSON (routing members the miner forged aside),
    /// and the routing read back exactly.
    #[test]
    fn miner_lines_round_trip(
        obj in miner_object(),
        pretty in any::<bool>(),
        client_id in any::<u32>(),
        address in "[0-9a-f.:]{1,39}",
        server in 0u64..8,
    ) {
        let line = if pretty { serde_json::to_string_pretty(&obj) } else { serde_json::to_string(&obj) }.unwrap();
        let line = line.replace('\n', " ");
        let mut up = Vec::new();
        passthrough::encode_miner_line(&mut up, line.as_bytes(), u64::from(client_id), &address, server).unwrap();
        prop_assert!(up.ends_with(b"}\n"), "{:?}", up);
        let mut back = Vec::new();
        let got = passthrough::decode_downstream(up.trim_ascii(), &mut back);
        prop_assert_eq!(got, FromDownstream::Miner {
            client_id: u64::from(client_id),
            address: Some(address.as_str()),
            server: Some(server),
        });
        let mut want = obj.clone();
        if let Some(m) = want.as_object_mut() {
            m.remove("client_id");
            m.remove("address");
            m.remove("server");
        }
        let back: serde_json::Value = serde_json::from_slice(&back).unwrap();
        prop_assert_eq!(&back, &want);
        // Pretty or compact in, compact out, byte for byte, the members in the miner's order.
        let mut exp = serde_json::to_string(&want).unwrap();
        exp.pop();
        if exp.len() > 1 {
            exp.push(',');
        }
        exp.push_str(&format!(
            "\"client_id\":{client_id},\"address\":{},\"server\":{server}}}\n",
            serde_json::to_string(&address).unwrap()
        ));
        prop_assert_eq!(String::from_utf8(up.clone()).unwrap(), exp);
    }

    /// Upstream line for a miner → passthrough → miner: the same JSON, routed to the same id.
    #[test]
    fn client_lines_round_trip(obj in miner_object(), method in "[a-z.]{1,14}", client_id in any::<u32>()) {
        let line = serde_json::to_string(&obj).unwrap();
        let mut down = Vec::new();
        passthrough::encode_for_client(&mut down, line.as_bytes(), &method, u64::from(client_id)).unwrap();
        let mut miner = Vec::new();
        let got = passthrough::decode_upstream(down.trim_ascii(), &mut miner);
        prop_assert_eq!(got, FromUpstream::Client { client_id: u64::from(client_id), node_method: Some(method.as_str()) });
        let mut want = obj.clone();
        if let Some(m) = want.as_object_mut() {
            m.remove("client_id");
            m.remove("node.method");
        }
        let miner: serde_json::Value = serde_json::from_slice(&miner).unwrap();
        prop_assert_eq!(miner, want);
    }

    /// Any bytes: no panic, and whatever is not a JSON object is text, written nowhere.
    #[test]
    fn any_bytes_are_survivable(bytes in prop::collection::vec(any::<u8>(), 0..200)) {
        let mut out = Vec::new();
        let up = passthrough::decode_upstream(&bytes, &mut out);
        let is_object = serde_json::from_slice::<serde_json::Value>(&bytes).is_ok_and(|v| v.is_object());
        if !is_object {
            prop_assert_eq!(up, FromUpstream::Text(&bytes));
            prop_assert!(out.is_empty());
        }
        let _ = passthrough::decode_downstream(&bytes, &mut out);
    }
}

/// Found by the `passthrough_frame` fuzz target: a member name is compared as JSON reads it, so
/// a miner cannot keep a routing member by escaping a letter of its name (ckpool, with jansson,
/// reads `client\u005fid` as `client_id`).
#[test]
fn escaped_routing_names_are_routing() {
    let mut out = Vec::new();
    let forged =
        br#"{"id":1,"client\u005fid":99,"addr\u0065ss":"1.2.3.4","method":"mining.submit"}"#;
    passthrough::encode_miner_line(&mut out, forged, 5, "127.0.0.1", 0).unwrap();
    assert_eq!(
        String::from_utf8(out.clone()).unwrap(),
        "{\"id\":1,\"method\":\"mining.submit\",\"client_id\":5,\"address\":\"127.0.0.1\",\"server\":0}\n"
    );
    let mut back = Vec::new();
    assert_eq!(
        passthrough::decode_downstream(br#"{"id":1,"client\u005fid":7,"method":"m"}"#, &mut back),
        FromDownstream::Miner {
            client_id: 7,
            address: None,
            server: None
        }
    );
    assert_eq!(back, b"{\"id\":1,\"method\":\"m\"}\n");
    back.clear();
    assert_eq!(
        passthrough::decode_upstream(
            br#"{"id":1,"node\u002emethod":"diff","client_id":3}"#,
            &mut back
        ),
        FromUpstream::Client {
            client_id: 3,
            node_method: Some("diff")
        }
    );
    assert_eq!(back, b"{\"id\":1}\n");
    assert_eq!(
        passthrough::decode_upstream(br#"{"r\u0065sult":true}"#, &mut Vec::new()),
        FromUpstream::HandshakeOk
    );
}

/// Found by the `passthrough_frame` fuzz target: of members with the same name the last one
/// counts, as for jansson (ckpool) and serde_json.
#[test]
fn the_last_member_of_a_name_counts() {
    let mut back = Vec::new();
    assert_eq!(
        passthrough::decode_downstream(
            br#"{"client_id":5,"id":1,"client_id":6,"server":1,"server":2}"#,
            &mut back
        ),
        FromDownstream::Miner {
            client_id: 6,
            address: None,
            server: Some(2)
        }
    );
    assert_eq!(back, b"{\"id\":1}\n");
    assert_eq!(
        passthrough::decode_downstream(
            br#"{"client_id":5,"method":"mining.submit","method":"mining.term"}"#,
            &mut back
        ),
        FromDownstream::Term { client_id: 5 }
    );
}

/// Found by the `passthrough_frame` fuzz target: every `u64` id round-trips, 20 digits too.
#[test]
fn every_u64_id_round_trips() {
    for id in [
        0,
        9_999_999_999_999_999_999,
        10_000_000_000_000_000_000,
        u64::MAX,
    ] {
        let mut out = Vec::new();
        passthrough::encode_miner_line(&mut out, b"{}", id, "::1", u64::MAX).unwrap();
        assert_eq!(
            passthrough::decode_downstream(out.trim_ascii(), &mut Vec::new()),
            FromDownstream::Miner {
                client_id: id,
                address: Some("::1"),
                server: Some(u64::MAX)
            }
        );
        out.clear();
        passthrough::encode_for_client(&mut out, b"{}", "diff", id).unwrap();
        assert_eq!(
            passthrough::decode_upstream(out.trim_ascii(), &mut Vec::new()),
            FromUpstream::Client {
                client_id: id,
                node_method: Some("diff")
            }
        );
        let drop = format!("dropclient={id}");
        assert_eq!(
            passthrough::decode_upstream(drop.as_bytes(), &mut Vec::new()).dropclient(),
            Some(id)
        );
    }
    // One past u64::MAX is no id.
    assert_eq!(
        passthrough::decode_downstream(br#"{"client_id":18446744073709551616}"#, &mut Vec::new()),
        FromDownstream::Invalid
    );
}

/// Found by the `passthrough_frame` fuzz target: a miner's line of 30 members became 33 with the
/// routing members, more than the pool side reads, so the pool dropped what the passthrough
/// sent. Such a line is now refused at the passthrough, and likewise a line for a miner.
#[test]
fn a_line_the_other_side_cannot_read_is_refused() {
    let object = |n: usize| {
        let members: Vec<String> = (0..n).map(|i| format!("\"m{i}\":{i}")).collect();
        format!("{{{}}}", members.join(","))
    };
    let mut out = Vec::new();
    passthrough::encode_miner_line(&mut out, object(29).as_bytes(), 1, "::1", 0).unwrap();
    assert!(matches!(
        passthrough::decode_downstream(out.trim_ascii(), &mut Vec::new()),
        FromDownstream::Miner { client_id: 1, .. }
    ));
    out.clear();
    assert!(passthrough::encode_miner_line(&mut out, object(30).as_bytes(), 1, "::1", 0).is_err());
    assert!(out.is_empty());
    // The miner's own routing members do not count: they are dropped.
    let forged = object(29).replacen('{', "{\"client_id\":9,", 1);
    passthrough::encode_miner_line(&mut out, forged.as_bytes(), 1, "::1", 0).unwrap();
    out.clear();
    passthrough::encode_for_client(&mut out, object(30).as_bytes(), "diff", 1).unwrap();
    assert!(matches!(
        passthrough::decode_upstream(out.trim_ascii(), &mut Vec::new()),
        FromUpstream::Client { client_id: 1, .. }
    ));
    out.clear();
    assert!(passthrough::encode_for_client(&mut out, object(31).as_bytes(), "diff", 1).is_err());
    assert!(out.is_empty());
}
