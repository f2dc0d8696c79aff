"""An SMTP upstream for the tlsbridge tests: aiosmtpd that requires STARTTLS with TLS 1.2 or newer.

Usage: smtp_upstream.py PORT OUTDIR CERT KEY
Listens on 127.0.0.1:PORT (0 picks a free port), prints "ready PORT" once listening, and saves
each message as OUTDIR/<n>.eml (written to a temporary name first, then renamed). Ends when its
standard input closes.
"""

import asyncio
import itertools
import os
import ssl
import sys

from aiosmtpd.smtp import SMTP


class SaveToDir:
    def __init__(self, outdir):
        self.outdir = outdir
        self.counter = itertools.count(1)

    async def handle_DATA(self, server, session, envelope):
        n = next(self.counter)
        tmp = os.path.join(self.outdir, f".{n}.tmp")
        with open(tmp, "wb") as f:
            f.write(envelope.original_content or b"")
        os.rename(tmp, os.path.join(self.outdir, f"{n}.eml"))
        return "250 2.0.0 OK saved"


async def main():
    port, outdir, cert, key = int(sys.argv[1]), sys.argv[2], sys.argv[3], sys.argv[4]
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    ctx.load_cert_chain(cert, key)
    handler = SaveToDir(outdir)
    loop = asyncio.get_running_loop()
    server = await loop.create_server(
        lambda: SMTP(
            handler,
            hostname="upstream.localhost",
            tls_context=ctx,
            require_starttls=True,
            auth_require_tls=True,
        ),
        host="127.0.0.1",
        port=port,
    )
    bound = server.sockets[0].getsockname()[1]
    print(f"ready {bound}", flush=True)
    # Serve until the test closes our standard input (or kills us).
    await loop.run_in_executor(None, sys.stdin.buffer.read)
    server.close()
    await server.wait_closed()


if __name__ == "__main__":
    asyncio.run(main())
