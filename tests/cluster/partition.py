"""A network partition between one process and the API server, for tests: a TCP relay the
process's kubeconfig points at. ``cut()`` stops relaying in both directions without closing
anything - bytes already sent wait, as packets do for a partition to heal, and requests in
flight arrive late - and ``heal()`` lets them through. Loopback only (the lab's host IP)."""
from __future__ import annotations

import socket
import threading
from pathlib import Path

import yaml


class Partition:
    def __init__(self, host: str, upstream: tuple[str, int]) -> None:
        self.upstream = upstream
        self.open = threading.Event()
        self.open.set()
        self.server = socket.create_server((host, 0))
        self.address = self.server.getsockname()[:2]
        self._sockets: list[socket.socket] = []
        self._stopped = False
        threading.Thread(target=self._accept, daemon=True).start()

    def kubeconfig(self, source: str, dest: Path) -> str:
        """``source`` with its cluster's server pointed at this relay (TLS passes through:
        the API server's certificate names the host IP, whatever the port)."""
        config = yaml.safe_load(Path(source).read_text())
        for cluster in config["clusters"]:
            cluster["cluster"]["server"] = f"https://{self.address[0]}:{self.address[1]}"
        dest.write_text(yaml.safe_dump(config))
        return str(dest)

    def cut(self) -> None:
        self.open.clear()

    def heal(self) -> None:
        self.open.set()

    def close(self) -> None:
        self._stopped = True
        self.open.set()
        for s in [self.server, *self._sockets]:
            try:
                s.close()
            except OSError:
                pass

    def _accept(self) -> None:
        while not self._stopped:
            try:
                client, _ = self.server.accept()
                upstream = socket.create_connection(self.upstream)
            except OSError:
                return
            self._sockets += [client, upstream]
            for src, dst in ((client, upstream), (upstream, client)):
                threading.Thread(target=self._pump, args=(src, dst), daemon=True).start()

    def _pump(self, src: socket.socket, dst: socket.socket) -> None:
        try:
            while True:
                self.open.wait()
                data = src.recv(65536)
                if not data:
                    break
                self.open.wait()  # read before the cut: held until the partition heals
                dst.sendall(data)
        except OSError:
            pass
        finally:
            for s in (src, dst):
                try:
                    s.shutdown(socket.SHUT_RDWR)
                except OSError:
                    pass
