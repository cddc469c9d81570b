# Connects to the agent, forks, and lets the child relay a client's bytes over that connection.
# With "exit" the process that connected is gone before any request is sent: its pid must not
# give anyone an identity. With "stay" it lives on and the request is served as its own.
import os
import select
import socket
import sys
import time

agent_socket, relay_path, mode = sys.argv[1:4]
upstream = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
upstream.connect(agent_socket)
parent = os.getpid()
if os.fork():
    if mode == "exit":
        time.sleep(0.3)  # let the agent accept the connection while this process still lives
        os._exit(0)
    os.wait()
    os._exit(0)

if mode == "exit":
    while os.getppid() == parent:
        time.sleep(0.01)
listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
listener.bind(relay_path)
listener.listen(1)
print("ready", flush=True)
client, _ = listener.accept()
peers = {client: upstream, upstream: client}
deadline = time.monotonic() + 30
while time.monotonic() < deadline:
    readable, _, _ = select.select(list(peers), [], [], 1)
    for sock in readable:
        data = sock.recv(65536)
        if not data:
            os._exit(0)
        peers[sock].sendall(data)
os._exit(0)
