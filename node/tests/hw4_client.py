"""A client written for the course's HW4 API, used unchanged against kvstore.

Usage: python3 hw4_client.py NODE [NODE ...]   (each NODE is ip:port)

It does what the course's grading script does: form-encoded bodies (even on GET), the JSON fields and
status codes of the contract, causal payloads passed back from each answer. Prints ALL OK on success.
"""
import sys

import requests


def url(node, path):
    return "http://%s/kv-store/%s" % (node, path)


def check(cond, what):
    if not cond:
        print("FAILED: " + what)
        sys.exit(1)


def main(nodes):
    payload = ""
    # Writes through every node, reads back through every other node, carrying the payload.
    for i in range(20):
        node = nodes[i % len(nodes)]
        r = requests.put(url(node, "py_key_%d" % i), data={"val": "value %d" % i, "causal_payload": payload})
        check(r.status_code in (200, 201), "PUT status %d %s" % (r.status_code, r.text))
        body = r.json()
        check(body["result"] == "success", "PUT result %r" % body)
        check(isinstance(body["partition_id"], int), "partition_id is an int: %r" % body)
        check("timestamp" in body, "PUT has timestamp: %r" % body)
        payload = body["causal_payload"]
    for i in range(20):
        node = nodes[(i + 1) % len(nodes)]
        r = requests.get(url(node, "py_key_%d" % i), data={"causal_payload": payload})
        check(r.status_code == 200, "GET status %d %s" % (r.status_code, r.text))
        body = r.json()
        check(body["value"] == "value %d" % i, "GET value %r" % body)
        payload = body["causal_payload"]

    # Replacing answers 200, new keys 201.
    r = requests.put(url(nodes[0], "py_key_0"), data={"val": "changed", "causal_payload": payload})
    check(r.status_code == 200, "replace answers 200, got %d" % r.status_code)
    payload = r.json()["causal_payload"]
    r = requests.get(url(nodes[-1], "py_key_0"), data={"causal_payload": payload})
    check(r.json()["value"] == "changed", "read-your-writes on another node: %r" % r.json())

    # Missing key, bad key.
    r = requests.get(url(nodes[0], "py_missing"), data={"causal_payload": ""})
    check(r.status_code == 404 and r.json()["result"] == "error", "missing key: %d %s" % (r.status_code, r.text))
    r = requests.put(url(nodes[0], "bad-key!"), data={"val": "x", "causal_payload": ""})
    check(r.status_code == 400 and r.json()["result"] == "error" and r.json()["msg"], "bad key: %s" % r.text)

    # Partition routes.
    ids = requests.get(url(nodes[0], "get_all_partition_ids")).json()["partition_id_list"]
    check(ids == list(range(len(ids))), "partition ids are 0..P-1: %r" % ids)
    members = []
    for pid in ids:
        r = requests.get(url(nodes[0], "get_partition_members"), data={"partition_id": pid})
        members += r.json()["partition_members"]
    check(sorted(members) == sorted(nodes), "members cover the view: %r" % members)
    for node in nodes:
        pid = requests.get(url(node, "get_partition_id")).json()["partition_id"]
        check(pid in ids, "node's partition id %r in %r" % (pid, ids))
    print("ALL OK")


if __name__ == "__main__":
    main(sys.argv[1:])
