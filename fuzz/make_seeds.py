#!/usr/bin/env python3
"""Writes the seed corpus (fuzz/corpus/<target>/seed-*) from the repository's testdata and the
captures in a testdata directory given as the first argument (e.g. /work/shared/testdata).

Run from fuzz/: python3 make_seeds.py [CAPTURES_DIR]. Deterministic; seeds are small."""
import hashlib, json, os, random, struct, sys

HERE = os.path.dirname(os.path.abspath(__file__))
TESTDATA = os.path.join(HERE, "..", "testdata")
CAPTURES = sys.argv[1] if len(sys.argv) > 1 else TESTDATA
JOB_ID = "0000000100000001"  # the first job of a pool seeded with 1 (fuzz/src/setup.rs)
NTIME = None


def put(target, name, data):
    d = os.path.join(HERE, "corpus", target)
    os.makedirs(d, exist_ok=True)
    if isinstance(data, str):
        data = data.encode()
    with open(os.path.join(d, "seed-" + name), "wb") as f:
        f.write(data)


def jsonl(path):
    if not os.path.exists(path):
        return []
    with open(path) as f:
        return [json.loads(l) for l in f if l.strip()]


def template_json(name):
    with open(os.path.join(TESTDATA, name)) as f:
        return json.load(f)


seg = template_json("core-regtest-gbt-12tx-segwit.json")
seg = seg.get("result", seg)
NTIME = seg["curtime"]

# ---- stratum_line: real client and pool lines -----------------------------------------------
lines = []
with open(os.path.join(TESTDATA, "bitaxe-v2.2-session.jsonl")) as f:
    lines += [l.rstrip("\n") for l in f if l.strip()]
for cap in ["ckpool-0.9.9-passthrough-link.jsonl", "ckpool-0.9.9-proxy-upstream.jsonl",
            "ckpool-0.9.9-node-link.jsonl"]:
    for rec in jsonl(os.path.join(CAPTURES, cap)):
        if len(rec["line"]) <= 600:
            lines.append(rec["line"])
lines += [
    '{"params": ["ckload.1", "1a2b", "00000000", "6500abcd", "1234abcd"], "id": 17, "method": "mining.submit"}',
    '{"id":"x1","method":"mining.authorize","params":["user.worker","x"]}',
    '{"id":null,"method":"mining.subscribe","params":[]}',
    '{"id":1.5,"method":"x"}', '{"id":[1,2],"method":"x"}', '{"id":1,"result":true,"error":null}',
    '{"id":1,"method":5}', '{"id":1,"method":"mining.suggest_difficulty","params":[8]}',
    '{"id":1,"id":2,"method":"m","params":[]}', '{"id":007,"method":"m"}',
    '{"id":1e400,"method":"m"}', '{"id":18446744073709551616,"method":"m"}',
    '{"id":"\\u0041\\n","method":"m\\"","params":["\\u00e9"]}', '[1,2]', '{',
]
seen = set()
for l in lines:
    h = hashlib.sha1(l.encode()).hexdigest()[:12]
    if h not in seen:
        seen.add(h)
        put("stratum_line", h, l)

# ---- shard_dispatch: event sequences (see bodies::shard_dispatch for the encoding) ------------
def raw(slot, line):
    b = line.encode()[:255]
    return bytes([2, slot, 15, len(b)]) + b

def open_(slot):
    return bytes([0, slot])

def tick(slot, ms50):
    return bytes([6, slot]) + struct.pack("<H", ms50)

SUB = '{"id":1,"method":"mining.subscribe","params":["bitaxe v2.2"]}'
AUTH = '{"id":2,"method":"mining.authorize","params":["fuzz.rig","x"]}'
SOLO_AUTH = '{"id":2,"method":"mining.authorize","params":["mnNghRjeAKbTqkvMYaE6kzkpsfWVdt3TRZ.a","x"]}'
def submit(user, n2, nonce, vbits=None):
    p = [user, JOB_ID, n2, "%08x" % NTIME, "%08x" % nonce] + ([vbits] if vbits else [])
    return json.dumps({"id": 4, "method": "mining.submit", "params": p}, separators=(",", ":"))

bitaxe = [l.rstrip("\n") for l in open(os.path.join(TESTDATA, "bitaxe-v2.2-session.jsonl")) if l.strip()]
seqs = {
    "bitaxe": b"\x00" + open_(0) + b"".join(raw(0, l) for l in bitaxe),
    "bitaxe-solo": b"\x01" + open_(0) + b"".join(raw(0, l) for l in bitaxe),
    "pool-submits": b"\x00" + open_(1) + raw(1, SUB) + raw(1, AUTH)
        + b"".join(raw(1, submit("fuzz.rig", "%016x" % i, i * 7919)) for i in range(4))
        + raw(1, submit("fuzz.rig", "%016x" % 9, 5, "00002000")) + tick(1, 1200),
    "solo-submits": b"\x01" + open_(2) + raw(2, SUB) + raw(2, SOLO_AUTH)
        + b"".join(raw(2, submit("mnNghRjeAKbTqkvMYaE6kzkpsfWVdt3TRZ.a", "%016x" % i, i)) for i in range(3)),
    "two-miners-new-block": b"\x00" + open_(0) + open_(1) + raw(0, SUB) + raw(1, SUB)
        + raw(0, AUTH) + bytes([7, 0, 1]) + raw(1, AUTH) + bytes([8, 0]) + bytes([1, 0]) + open_(0)
        + raw(0, SUB) + tick(0, 2000),
    "auth-timeout": b"\x00" + open_(3) + raw(3, SUB) + tick(3, 1300) + open_(3) + raw(3, AUTH),
    "garbage": b"\x00" + open_(0) + raw(0, '{"id":1,"method":"mining.subscribe"') + raw(0, SUB),
    "extranonce": b"\x00" + open_(0) + raw(0, SUB)
        + raw(0, '{"id":3,"method":"mining.extranonce.subscribe","params":[]}') + raw(0, AUTH)
        + bytes([8, 0]) + raw(0, submit("fuzz.rig", "00" * 8, 1)),
}
for name, data in seqs.items():
    put("shard_dispatch", name, data)
rng = random.Random(1)
for i in range(8):
    put("shard_dispatch", "random-%d" % i, bytes(rng.randrange(256) for _ in range(96)))

# ---- submit: flags byte then fields (see bodies::submit) --------------------------------------
for flags in range(16):
    put("submit", "flags-%02d" % flags, bytes([flags]) + bytes(rng.randrange(256) for _ in range(48)))

# ---- gbt: Core templates, bare and as whole RPC replies ---------------------------------------
for name in sorted(os.listdir(TESTDATA)):
    if name.startswith("core-") and name.endswith(".json"):
        t = template_json(name)
        t = t.get("result", t)
        put("gbt", name, json.dumps(t))
        put("gbt", "reply-" + name, json.dumps({"result": t, "error": None, "id": 1}))
put("gbt", "rpc-error", '{"result":null,"error":{"code":-10,"message":"Bitcoin Core is in initial sync"},"id":1}')

# ---- admin_frame: chunk size byte, then framed messages ---------------------------------------
def frame(b):
    return struct.pack("<I", len(b)) + b

for i, rec in enumerate(jsonl(os.path.join(CAPTURES, "ckpool-0.9.9-admin.jsonl"))):
    msg = frame(rec["request"].encode())
    if rec.get("response"):
        msg += frame(rec["response"].encode())
    put("admin_frame", "%02d-%s" % (i, rec["request"].split("=")[0]), bytes([i]) + msg)
put("admin_frame", "empty-length", b"\x03" + struct.pack("<I", 0))
put("admin_frame", "too-long", b"\x02" + struct.pack("<I", (16 << 20) + 1) + b"stats")
put("admin_frame", "short", b"\x00" + struct.pack("<I", 10) + b"stats")

# ---- config -----------------------------------------------------------------------------------
with open(os.path.join(HERE, "..", "ckpool.conf.example")) as f:
    put("config", "ckpool.conf.example", f.read())
put("config", "full", json.dumps({
    "btcd": [{"url": "http://127.0.0.1:8332", "auth": "u", "pass": "p", "notify": True},
             {"url": "10.0.0.2:8332", "cookie": "/var/lib/bitcoind/.cookie"}],
    "btcaddress": "bc1qexample", "btcsig": "/sig/", "blockpoll": 50, "donation": 1.5,
    "donaddress": "bc1qdonate", "nonce1length": 4, "nonce2length": 8, "update_interval": 20,
    "version_mask": "1fffe000", "serverurl": ["0.0.0.0:3333", "0.0.0.0:4334"],
    "mindiff": 0.5, "startdiff": 1024, "highdiff": 1000000, "maxdiff": 0, "logdir": "logs",
    "maxclients": 100000, "zmqblock": None, "maxlinelength": 4096, "threads": 2, "io": "epoll",
    "handoff": "queue", "authtimeout": 30,
    "listendiff": [{"url": "0.0.0.0:4334", "startdiff": 65536, "mindiff": 4096}],
    "useragentdiff": [{"match": "NiceHash", "mindiff": 500000}], "diffpow2": True, "pin": False,
    "statsupdate": 10, "unknown_key": 1}, indent=1) + "\ntrailing comment")
put("config", "bad-types", '{"btcd": {}, "mindiff": "1", "nonce2length": 2.5}')
put("config", "startdiff-below-mindiff", '{"mindiff": 100, "startdiff": 1, "maxdiff": 50}')

# ---- rpc_reply: status choice byte, chunking byte, then the body (see bodies::rpc_reply) -------
for name in ["core-regtest-gbt-height1-empty.json", "core-signet51-gbt-height1.json",
             "core-testnet3-gbt-2442185.json"]:
    t = template_json(name)
    t = t.get("result", t)
    body = json.dumps({"result": t, "error": None, "id": 1}).encode()
    put("rpc_reply", name, bytes([7, 0]) + body)
    put("rpc_reply", "chunked-" + name, bytes([7, 0x85]) + body)
put("rpc_reply", "rpc-error-500", bytes([0, 0]) + b'{"result":null,"error":{"code":-10,"message":"Bitcoin Core is in initial sync"},"id":1}')
put("rpc_reply", "method-not-found-404", bytes([1, 0]) + b'{"result":null,"error":{"code":-32601,"message":"Method not found"},"id":1}')
put("rpc_reply", "unauthorized-401", bytes([2, 0]))
put("rpc_reply", "work-queue-503", bytes([3, 0]) + b"Work queue depth exceeded")
put("rpc_reply", "no-result", bytes([7, 0]) + b'{"error":null,"id":1}')
put("rpc_reply", "not-object", bytes([7, 0]) + b"[1,2,3]")
put("rpc_reply", "error-string", bytes([7, 0]) + b'{"result":1,"error":"bad","id":1}')

# ---- passthrough_frame: selector, client id, server, address, name, then one line -------------
# (see bodies::passthrough_frame). Every kind of line of the ckpool 0.9.9 passthrough and node
# captures (two of each), both directions, plus hand-made edge cases.
def pt(sel, cid, server, address, name, line):
    a, n = address.encode()[:255], name.encode()[:255]
    if isinstance(line, str):
        line = line.encode()
    return (bytes([sel]) + struct.pack("<QQ", cid, server) + bytes([len(a)]) + a
            + bytes([len(n)]) + n + line)

kinds = {}
for cap, sel in [("ckpool-0.9.9-passthrough-link.jsonl", 0), ("ckpool-0.9.9-node-link.jsonl", 2)]:
    for rec in jsonl(os.path.join(CAPTURES, cap)):
        line = rec["line"]
        try:
            obj = json.loads(line)
        except ValueError:
            obj = {}
        kind = (cap, rec["dir"], obj.get("method"), obj.get("node.method"))
        kinds[kind] = kinds.get(kind, 0) + 1
        if kinds[kind] > 2:
            continue
        cid = obj.get("client_id", 1) if isinstance(obj.get("client_id"), int) else 1
        name = obj.get("node.method") or "ckpool/0.9.9"
        h = hashlib.sha1(line.encode()).hexdigest()[:12]
        put("passthrough_frame", h, pt(sel, cid, 0, "127.0.0.1", name, line))
for name, line in [
    ("dropclient", "dropclient=3"),
    ("forged-routing", '{"id":1,"client_id":99,"method":"mining.submit","address":"1.2.3.4","server":7,"params":[]}'),
    ("escaped-key", '{"id":1,"client\\u005fid":99,"method":"mining.submit","params":[]}'),
    ("duplicate-id", '{"id":1,"client_id":5,"method":"mining.submit","client_id":6}'),
    ("big-id", '{"id":1,"client_id":18446744073709551615,"method":"x"}'),
    ("handshake-escaped", '{"method":"mining.passthrough","params":["a\\/b \\u00e9"]}'),
    ("term", '{"id":42,"client_id":7,"address":"::1","server":1,"method":"mining.term","params":[]}'),
    ("deep", '{"a":' + "[" * 33 + "]" * 33 + "}"),
    ("result-true", '{ "result" : true }'),
]:
    put("passthrough_frame", name, pt(0, 2**64 - 1 if name == "big-id" else 5, 3, "10.0.0.7", "share.result", line))
put("passthrough_frame", "built-1", bytes([1]) + bytes(range(256)) * 2)
put("passthrough_frame", "built-2", bytes([3]) + hashlib.sha512(b"workinfo").digest() * 8)
