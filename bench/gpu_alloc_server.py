"""The stand-in model server of the GPU checks (bench/gpu_check.py, bench/restart_gpu_check.py): it
allocates GiB on the GPU in itself and in a forked worker (like vLLM's API server and its EngineCore),
then answers every GET with 200. Run as ``python -c SERVER PORT GIB``; with 0 GiB it needs no torch."""

SERVER = r"""
import http.server, os, sys, time
gb = float(sys.argv[2])
if gb > 0:
    import torch
    worker = os.fork()
    if worker == 0:  # the "EngineCore": holds memory too, in the same process group
        x = torch.empty(int(gb * 2**30), dtype=torch.uint8, device="cuda")
        torch.cuda.synchronize()
        while True:
            time.sleep(1)
    x = torch.empty(int(gb * 2**30), dtype=torch.uint8, device="cuda")
    torch.cuda.synchronize()
    time.sleep(1.0)  # let the worker allocate before reporting ready

class H(http.server.BaseHTTPRequestHandler):
    def do_GET(self):
        self.send_response(200); self.end_headers()
    def log_message(self, *a):
        pass

print("ready", flush=True)
http.server.HTTPServer(("127.0.0.1", int(sys.argv[1])), H).serve_forever()
"""
