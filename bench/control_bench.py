#!/usr/bin/env python3
"""Control-path benchmark of volume-daemon against the CloudStack simulator (`cloudsim` in its own process,
so that the daemon's RSS is the daemon's alone; `--sim-in-process` runs `serve --sim` instead).

Measures, client-side (POST, then GET /operations/{id}?wait=):
  - per-operation overhead beyond the cloud job (create, attach, detach; delete has no job) at the
    simulator's job delays 0 and 200 ms, sequentially (median, p99);
  - the same under 50 concurrent streams (p50/p99; at most 5 hold an appliance attachment at once,
    as CloudStack limits a VM's data disks);
  - create+delete lifecycles per minute against a zero-delay simulator (50 streams);
  - GET /volumes at 100, 1,000 and 10,000 volumes, unpaginated and one page of 100;
  - start-up time to a healthy API, and the daemon's RSS idle and after the largest listing.

Each figure is measured against a fresh daemon and simulator in a temporary directory, every listener on
port 0.

Usage: bench/control-bench.sh [--quick] [--max-volumes N] [--sim-in-process]   (builds the release binary, then runs this)
       bench/control_bench.py --daemon target/release/volume-daemon [...]
"""

import argparse
import http.client
import json
import os
import re
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time


def pct(values, p):
    if not values:
        return float("nan")
    s = sorted(values)
    k = min(len(s) - 1, max(0, int(round(p / 100.0 * (len(s) - 1)))))
    return s[k]


class Api:
    """One keep-alive HTTP connection (one per thread)."""

    def __init__(self, addr):
        host, port = addr.rsplit(":", 1)
        self.conn = http.client.HTTPConnection(host, int(port), timeout=120)

    def call(self, method, path, body=None):
        headers = {"content-type": "application/json"} if body is not None else {}
        data = json.dumps(body) if body is not None else None
        try:
            self.conn.request(method, "/api/v1" + path, body=data, headers=headers)
            resp = self.conn.getresponse()
        except (http.client.RemoteDisconnected, ConnectionResetError, BrokenPipeError):
            # The server closes keep-alive connections idle longer than api_header_timeout_secs:
            # a request that found its connection closed was never read; send it on a new one.
            self.conn.close()
            self.conn.request(method, "/api/v1" + path, body=data, headers=headers)
            resp = self.conn.getresponse()
        raw = resp.read()
        return resp.status, raw, resp

    def json(self, method, path, body=None):
        status, raw, _ = self.call(method, path, body)
        if status >= 400:
            raise RuntimeError(f"{method} {path}: HTTP {status}: {raw[:300]!r}")
        return json.loads(raw) if raw else None

    def op(self, method, path, body=None):
        """Submits a mutation and waits for it; returns (seconds, operation)."""
        t0 = time.perf_counter()
        op = self.json(method, path, body)
        done = self.json("GET", f"/operations/{op['id']}?wait=120")
        elapsed = time.perf_counter() - t0
        if done["status"] != "completed":
            raise RuntimeError(f"{method} {path}: operation {done['status']}: {done.get('error')}")
        return elapsed, done


# The appliance VM of the out-of-process simulator (any UUID; the daemon is told it).
APPLIANCE_VM = "1b2f6a7e-0c55-4d0f-9a41-3c3f9e0e2a11"


def spawn_until(cmd, marker, env):
    """Starts `cmd` and reads its stdout up to the line starting with `marker`; returns (process, rest of
    that line), and keeps draining stdout so the child never blocks on a full pipe."""
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True, env=env)
    found = None
    for line in proc.stdout:
        if line.startswith(marker):
            found = line[len(marker):].strip()
            break
    if found is None:
        proc.wait()
        raise RuntimeError(f"{cmd[0]} exited before printing {marker!r}")
    threading.Thread(target=proc.stdout.read, daemon=True).start()
    return proc, found


def rss_mb(pid):
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024.0
    return float("nan")


def stop(proc):
    if proc and proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


class Daemon:
    """The daemon under test and its simulator: by default `cloudsim` in its own process (so that the
    daemon's RSS is its own), with `in_process` the simulator inside the daemon (`serve --sim`)."""

    def __init__(self, binary, job_delay_ms, state_dir, in_process=False):
        self.binary = binary
        self.job_delay_ms = job_delay_ms
        self.state_dir = state_dir
        self.in_process = in_process
        self.proc = None
        self.sim = None
        self.addr = None
        self.sim_addr = None
        self.startup = None

    def start(self):
        DAEMONS.append(self)
        env = {**os.environ, "RUST_LOG": "warn"}
        common = ["--listen", "127.0.0.1:0", "--nbd-listen", "127.0.0.1:0"]
        if self.in_process:
            cmd = [self.binary, "serve", "--sim", "--state-dir", self.state_dir, *common,
                   "--sim-listen", "127.0.0.1:0", "--sim-job-delay-ms", str(self.job_delay_ms)]
        else:
            cloudsim = os.path.join(os.path.dirname(self.binary), "cloudsim")
            by_id = os.path.join(self.state_dir, "by-id")
            self.sim, self.sim_addr = spawn_until(
                [cloudsim, "--listen", "127.0.0.1:0", "--state-dir", os.path.join(self.state_dir, "sim"),
                 "--by-id-dir", by_id, "--appliance-vm-id", APPLIANCE_VM,
                 "--job-delay-ms", str(self.job_delay_ms)],
                "listening on ", env)
            cmd = [self.binary, "serve", "--state-dir", os.path.join(self.state_dir, "daemon"), *common,
                   "--cloudstack-url", f"http://{self.sim_addr}/client/api",
                   "--cloudstack-api-key", "sim-api-key", "--cloudstack-secret-key", "sim-secret-key",
                   "--appliance-vm-id", APPLIANCE_VM, "--by-id-dir", by_id]
            if os.geteuid() != 0:  # the simulator backs attachments with plain files then
                env["VOLUME_DAEMON_ALLOW_REGULAR_FILES"] = "true"
        t0 = time.perf_counter()
        if self.in_process:
            self.proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True,
                                         env=env)
            for line in self.proc.stdout:
                m = re.match(r"cloudsim listening on (\S+)", line)
                if m:
                    self.sim_addr = m.group(1)
                m = re.match(r"api listening on (\S+)", line)
                if m:
                    self.addr = m.group(1)
                    break
            if self.addr is None:
                raise RuntimeError("the daemon exited before printing its API address")
            threading.Thread(target=self.proc.stdout.read, daemon=True).start()
        else:
            self.proc, self.addr = spawn_until(cmd, "api listening on ", env)
        api = Api(self.addr)
        while True:
            status, _, _ = api.call("GET", "/health")
            if status == 200:
                break
            time.sleep(0.005)
        self.startup = time.perf_counter() - t0
        return api

    def rss_mb(self):
        return rss_mb(self.proc.pid)

    def sim_rss_mb(self):
        return rss_mb(self.sim.pid) if self.sim else float("nan")

    def stop(self):
        stop(self.proc)
        stop(self.sim)


def sim_catalog(daemon):
    """Zone id and custom-offering id, asked of the simulator over its own API (signed GET with the
    documented default credentials of `serve --sim`)."""
    import base64
    import hashlib
    import hmac
    import urllib.parse
    import urllib.request

    sim = daemon.sim_addr

    def signed(command):
        params = {"command": command, "apiKey": "sim-api-key", "response": "json"}
        q = "&".join(f"{k}={urllib.parse.quote(str(v), safe='*')}" for k, v in sorted(params.items()))
        sig = base64.b64encode(hmac.new(b"sim-secret-key", q.lower().encode(), hashlib.sha1).digest())
        url = f"http://{sim}/client/api?{q}&signature={urllib.parse.quote(sig.decode(), safe='')}"
        with urllib.request.urlopen(url) as r:
            return json.loads(r.read())

    zone = signed("listZones")["listzonesresponse"]["zone"][0]["id"]
    offerings = signed("listDiskOfferings")["listdiskofferingsresponse"]["diskoffering"]
    custom = [o["id"] for o in offerings if o.get("iscustomized")][0]
    return zone, custom


# CloudStack limits the data disks of one VM (6 on the simulator's default hypervisor): at most this
# many streams hold an appliance attachment at once; the others create and delete meanwhile.
ATTACH_SLOTS = threading.Semaphore(5)


def lifecycle(api, zone, offering, appliance, delay_s, out, tag):
    t, op = api.op("POST", "/volumes", {"name": f"bench-{tag}", "size": 1 << 30,
                                         "zone_id": zone, "disk_offering_id": offering})
    out["create"].append(t - delay_s)
    vol = op["response"]["volume_id"]
    with ATTACH_SLOTS:
        t, _ = api.op("POST", f"/volumes/{vol}/attach", {"vm_id": appliance})
        out["attach"].append(t - delay_s)
        t, _ = api.op("POST", f"/volumes/{vol}/detach")
        out["detach"].append(t - delay_s)
    t, _ = api.op("DELETE", f"/volumes/{vol}")
    out["delete"].append(t)


def run_streams(addr, streams, fn):
    errors = []

    def worker(i):
        try:
            fn(Api(addr), i)
        except Exception as e:  # reported below
            errors.append(repr(e))

    threads = [threading.Thread(target=worker, args=(i,)) for i in range(streams)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    if errors:
        raise RuntimeError(f"{len(errors)} stream(s) failed, first: {errors[0]}")


def ms(x):
    return f"{x * 1000:.1f}"


def bench_delay(binary, delay_ms, seq, streams, per_stream, in_process):
    with tempfile.TemporaryDirectory(prefix="vd-bench-") as state:
        d = Daemon(binary, delay_ms, state, in_process)
        api = d.start()
        zone, offering = sim_catalog(d)
        appliance = api.json("GET", "/appliance")["vm_id"]
        delay_s = delay_ms / 1000.0
        out = {"create": [], "attach": [], "detach": [], "delete": []}
        for i in range(seq):
            lifecycle(api, zone, offering, appliance, delay_s, out, f"s{i}")
        conc = {"create": [], "attach": [], "detach": [], "delete": []}
        lock = threading.Lock()

        def stream(a, i):
            local = {"create": [], "attach": [], "detach": [], "delete": []}
            for j in range(per_stream):
                lifecycle(a, zone, offering, appliance, delay_s, local, f"c{i}-{j}")
            with lock:
                for k, v in local.items():
                    conc[k].extend(v)

        if streams:
            run_streams(d.addr, streams, stream)
        d.stop()
        return d.startup, out, conc


def bench_scale(binary, sizes, page, lifecycle_secs, in_process):
    rows = []
    with tempfile.TemporaryDirectory(prefix="vd-bench-") as state:
        d = Daemon(binary, 0, state, in_process)
        api = d.start()
        zone, offering = sim_catalog(d)
        idle_rss = d.rss_mb()

        # Lifecycles per minute: 50 streams of create+delete for a fixed time.
        count = [0]
        lock = threading.Lock()
        stop_at = time.perf_counter() + lifecycle_secs

        def churn(a, i):
            j = 0
            while time.perf_counter() < stop_at:
                _, op = a.op("POST", "/volumes", {"name": f"churn-{i}-{j}", "size": 1 << 30,
                                                  "zone_id": zone, "disk_offering_id": offering})
                a.op("DELETE", f"/volumes/{op['response']['volume_id']}")
                j += 1
                with lock:
                    count[0] += 1

        t0 = time.perf_counter()
        run_streams(d.addr, 50, churn)
        per_min = count[0] / (time.perf_counter() - t0) * 60.0

        have = 0
        peak_rss = idle_rss
        for n in sizes:
            need = n - have
            t0 = time.perf_counter()

            def fill(a, i, need=need, base=have):
                for j in range(i, need, 50):
                    a.op("POST", "/volumes", {"name": f"list-{base + j}", "size": 1 << 30,
                                              "zone_id": zone, "disk_offering_id": offering})

            run_streams(d.addr, 50, fill)
            create_rate = need / (time.perf_counter() - t0)
            have = n
            # What the daemon holds before it lists (its database caches and, with --sim, the simulator's
            # state grow with the number of volumes): the listing's own share is the difference.
            before_rss = d.rss_mb()
            full = []
            for _ in range(5):
                t = time.perf_counter()
                status, raw, _ = api.call("GET", "/volumes")
                full.append(time.perf_counter() - t)
                assert status == 200, status
                assert len(json.loads(raw)) == n, "listing is incomplete"
                peak_rss = max(peak_rss, d.rss_mb())
            paged = []
            for _ in range(5):
                t = time.perf_counter()
                status, raw, _ = api.call("GET", f"/volumes?limit={page}")
                paged.append(time.perf_counter() - t)
            page_len = len(json.loads(raw))
            rows.append((n, create_rate, statistics.median(full), statistics.median(paged), page_len))
        time.sleep(2)
        after_rss = d.rss_mb()
        sim_rss = d.sim_rss_mb()
        d.stop()
        return d.startup, idle_rss, before_rss, peak_rss, after_rss, sim_rss, per_min, rows


DAEMONS = []


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--daemon", required=True)
    ap.add_argument("--quick", action="store_true", help="smaller counts (a smoke run)")
    ap.add_argument("--max-volumes", type=int, default=10000)
    ap.add_argument("--sim-in-process", action="store_true",
                    help="run the simulator inside the daemon (serve --sim): its state counts in the RSS")
    args = ap.parse_args()

    seq, streams, per_stream, secs = (20, 50, 2, 20.0)
    sizes = [s for s in (100, 1000, 10000) if s <= args.max_volumes]
    if args.quick:
        seq, streams, per_stream, secs = (5, 10, 1, 3.0)
        sizes = [s for s in (100, 1000) if s <= args.max_volumes]

    where = "in the daemon's process" if args.sim_in_process else "in its own process"
    print(f"# volume-daemon control path (simulator {where}; load average "
          f"{' '.join(f'{x:.2f}' for x in os.getloadavg())})")
    for delay in (0, 200):
        startup, out, conc = bench_delay(args.daemon, delay, seq, streams, per_stream,
                                           args.sim_in_process)
        print(f"\n## job delay {delay} ms  (start-up to healthy: {ms(startup)} ms)")
        print("| operation | sequential median (ms beyond job) | sequential p99 | "
              f"{streams} streams p50 | {streams} streams p99 |")
        print("|---|---|---|---|---|")
        for k in ("create", "attach", "detach", "delete"):
            print(f"| {k} | {ms(statistics.median(out[k]))} | {ms(pct(out[k], 99))} | "
                  f"{ms(pct(conc[k], 50))} | {ms(pct(conc[k], 99))} |")

    startup, idle, before, peak, after, sim_rss, per_min, rows = bench_scale(
        args.daemon, sizes, 100, secs, args.sim_in_process)
    print("\n## scale (job delay 0)\n")
    print(f"create+delete lifecycles per minute (50 streams): {per_min:.0f}")
    print("\n| volumes | create rate (/s) | GET /volumes median (ms) | "
          "GET /volumes?limit=100 median (ms) | page length |")
    print("|---|---|---|---|---|")
    for n, rate, full, paged, page_len in rows:
        print(f"| {n} | {rate:.0f} | {ms(full)} | {ms(paged)} | {page_len} |")
    print(f"\nstart-up to healthy: {ms(startup)} ms; RSS idle {idle:.1f} MB, before the largest listing "
          f"{before:.1f} MB, peak while listing {peak:.1f} MB, 2 s after the largest listing {after:.1f} MB"
          + ("" if args.sim_in_process else f" (the simulator's own process: {sim_rss:.1f} MB)"))
    print(f"load average at the end: {' '.join(f'{x:.2f}' for x in os.getloadavg())}")


if __name__ == "__main__":
    try:
        sys.exit(main())
    finally:
        for daemon in DAEMONS:  # also when a measurement failed: leave no daemon behind
            daemon.stop()
