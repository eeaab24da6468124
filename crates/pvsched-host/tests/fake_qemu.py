# A process that looks like QEMU to pvsched discovery: started with argv[0]
# `qemu-system-x86_64` and QEMU's -object memory-backend-file and -qmp options,
# it maps its "shared file" and answers QMP with two of its own thread ids.
#
# Environment: FAKE_SHM = "create" (create the file, map it shared read-write)
# or "map-ro" (map an existing file shared read-only). Prints
# "READY <tid> <tid>" once the threads and the socket exist.
import json
import mmap
import os
import socket
import sys
import threading
import time

args = sys.argv[1:]
mem_path = qmp_path = None
for flag, value in zip(args, args[1:]):
    if flag == "-object" and value.startswith("memory-backend-file"):
        mem_path = dict(p.split("=", 1) for p in value.split(",") if "=" in p)["mem-path"]
    if flag == "-qmp":
        qmp_path = value.split(",")[0][len("unix:"):]

if os.environ.get("FAKE_SHM") == "create":
    fd = os.open(mem_path, os.O_RDWR | os.O_CREAT | os.O_EXCL, 0o600)
    os.ftruncate(fd, 1 << 20)
    shared = mmap.mmap(fd, 1 << 20, mmap.MAP_SHARED, mmap.PROT_READ | mmap.PROT_WRITE)
else:
    fd = os.open(mem_path, os.O_RDONLY)
    shared = mmap.mmap(fd, 0, mmap.MAP_SHARED, mmap.PROT_READ)

tids = []
ready = threading.Barrier(3)


def vcpu():
    tids.append(threading.get_native_id())
    ready.wait()
    while True:
        time.sleep(0.005)


for _ in range(2):
    threading.Thread(target=vcpu, daemon=True).start()
ready.wait()
tids.sort()

listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
listener.bind(qmp_path)
listener.listen(8)
print("READY", *tids, flush=True)


def reply(conn, value, request):
    msg = {"return": value}
    if "id" in request:
        msg["id"] = request["id"]
    conn.sendall((json.dumps(msg) + "\r\n").encode())


while True:
    conn, _ = listener.accept()
    try:
        conn.sendall(b'{"QMP": {"version": {"qemu": {"major": 8, "minor": 2, "micro": 0}}, "capabilities": []}}\r\n')
        for line in conn.makefile("r"):
            if not line.strip():
                continue
            request = json.loads(line)
            command = request.get("execute")
            if command == "query-cpus-fast":
                reply(conn, [
                    {"cpu-index": i, "thread-id": t, "target": "x86_64",
                     "props": {"socket-id": 0, "core-id": i, "thread-id": 0}}
                    for i, t in enumerate(tids)
                ], request)
            elif command == "query-hotpluggable-cpus":
                reply(conn, [{"vcpus-count": 1, "props": {}} for _ in tids], request)
            elif command == "query-iothreads":
                reply(conn, [], request)
            else:
                reply(conn, {}, request)
    except (OSError, ValueError):
        pass
    finally:
        conn.close()
