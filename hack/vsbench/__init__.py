"""vsbench (run as ``hack/bench``): how fast a sandbox is ready (cold or from a template), how
many fit on a host, what the controller costs, and how fast its network is.

Run as root from anywhere: ``hack/bench [--quick] [--out FILE] [--parallel 1,5,10] [--no-network]
[--start-samples N] [--idle S] [--no-templates]``
(``hack/bench --help`` for all flags). It measures the vmsandbox of the checkout it sits in.
It prints a table, writes JSON (default ``bench-results/bench-<UTC time>.json``) and one PNG
per series next to it. Everything it makes carries the unique prefix ``bench-<random>``:
sandbox ids, libvirt domains, network namespaces and (unless ``--state-dir``) a temporary
state dir; all of it is removed at the end, also after an error or Ctrl-C. Other domains,
sandboxes and namespaces are never touched.

How the numbers are taken (host ``time.monotonic()`` throughout):

* Start latency, serial: create -> start -> first exec answered, split into phases
  (:mod:`.phases`). The controller reports each lifecycle step to the bench's observer
  (``LibvirtController(events=...)``), which stamps it: ``define`` ends at CREATED
  (``create()`` done), ``domain start`` at BOOTED (libvirt's ``create()`` returned, the VM's
  CPUs run); ``kernel to init`` ends when the guest's ``vmsandbox: init started`` line appears
  in the console log file (:mod:`.console`: one thread polls every watched file every 5 ms; a
  line's time is the midpoint of the poll that saw it and the one before); ``init script``
  ends at the ``vmsandbox: agent ready`` line; ``agent ready`` at AGENT_READY (the SSH
  handshake on the virtio-serial socket); ``running`` at RUNNING (mount checks, the record
  saved; ``start()`` returns); ``first exec`` when ``cat /proc/uptime`` answered. Samples
  alternate with the bare baseline below; warm-up starts are discarded. Each sample keeps
  every event it got, in ms since the bench called ``create()``.
* Guest side (:mod:`.guestlog`): the first exec returns the guest's uptime, which places the
  guest kernel's clock 0 on the host timeline (error: half that exec's round trip);
  ``dmesg`` (the ring buffer keeps messages that ``quiet`` hides from the console) gives
  "Run /init", "crng init done" and the biggest gaps in the kernel log.
* Controller overhead (:mod:`.bare`): the XML that the controller defined for a template
  sandbox (from its verbose status), renamed and pointed at its own console, socket and a
  copy of the config disk, is started with bare libvirt-python (``defineXML`` + ``create``,
  stamped by the bench around each call) and is ready when ``GuestAgent.connect`` (the same
  SSH handshake, same keys) returns. Reported as ours over bare; bare has no ``running``.
* Every sandbox the bench starts asks for its start path with the ``vmsandbox.io/start``
  annotation: ``cold`` everywhere except where a section says ``template``. After the first
  exec answered (the clock stopped), the bench reads QEMU's CPU seconds so far
  (utime + stime of ``/proc/<pid>/stat``, all threads) and the path the start really took
  (status verbose ``start``); a sample whose path is not the one asked is kept apart
  (``other_path_samples``) and counted, never mixed into that path's figures.
* Start paths (:mod:`.startpath`, JSON ``start_paths``): before the first template start,
  the template of the default shape is built (``warm_template``; JSON ``template``: its key,
  path, whether it was built now, the controller's ``build_s``, the call's ``call_s``,
  ``size_mib`` on disk; or ``skipped`` and why), then
  ``--start-samples`` serial starts of each path, cold and template alternated (which goes
  first swaps each round) after ``--warmup`` of each: create -> first exec answered
  (``first_exec_ms``), the phases (a template start ends "domain start" at RESTORED and has
  no console boot lines), QEMU CPU seconds, and ``template_over_cold_p50``.
* Memory by start path (``memory_by_start``): for each path, one at a time, 1 sandbox, then
  more to 5 (``--memory-levels``), each level read ``--idle`` seconds after its last
  sandbox answered: QEMU's PSS and RSS per sandbox and the PSS of its virtiofsd processes
  (found by libvirt's pid file ``/run/libvirt/qemu/<short name>-fs0-fs.pid``, with the
  child virtiofsd forks), keyed ``<path>.n<N>``.
* Parallel start: N threads create, start and exec at once; the time until all answered
  and sandboxes per second; cold at the ``--parallel`` levels (``parallel``), from the
  template at ``--template-parallel`` (``parallel_template``; default the levels >= 2).
* Parallel efficiency (``parallel_efficiency.<path>``): ``cpu_s_one_boot`` is the p50 of
  QEMU's CPU seconds over this run's serial starts of that path; for each level N >= 2,
  ``ideal_s`` = N x cpu_s_one_boot / host cores, ``efficiency`` = ideal_s / all_ready_s
  and ``target_met`` = all_ready_s <= 1.3 x ideal_s (issue 12's target).
* With every parallel batch still running: status, platform, metrics, list and
  ``exec(["true"])`` on the warm transport (round-robin over the sandboxes), QEMU's PSS per
  sandbox (``/proc/<pid>/smaps_rollup``) and this process's RSS (it is the controller).
  Then stop (clean power-off) and shutdown are timed one sandbox at a time on up to
  ``--stop-samples`` of them; the rest are forced off together.
* Network (:mod:`.network`, unless ``--no-network``): a CNI-style pod netns ``<prefix>-pod``
  whose eth0 is a veth (MTU 1500, 10.199.0.2/24) with its other end in a peer netns
  ``<prefix>-peer`` (10.199.0.1/24), and one sandbox created with that netns (the guest takes
  eth0 over: tap + tc redirect). All traffic is between the peer netns and the guest,
  nothing else. Round trip: busybox ``ping -i 0.2`` from the peer to the guest and from the
  guest (exec) to the peer, after one warm-up ping each way (ARP); per-reply times give
  min/avg/p50/p90/max. TCP: the peer (a small Python client run by ``ip netns exec``) sends
  ``--net-mib`` MiB to busybox ``nc -l`` in the guest and the clock stops when the guest's
  FIN arrives (nc sends it only after reading our EOF, so all data was read); the guest
  sends ``dd | nc`` to a Python receiver in the peer netns that counts the bytes; and the
  guest's busybox ``httpd`` serves a sparse file of the same size (sendfile) to a Python
  client in the peer netns. busybox nc moves the data in small writes, which under TCG
  makes the guest's CPU, not the network path, the limit of ``dd | nc``; the httpd figure
  shows the path itself.
* Statistics (:mod:`.stats`): p50/p90/p99 from ``statistics.quantiles(n=100,
  method="inclusive")``, linear between closest ranks as numpy's default.
* Noise: each start records how many other guests were running on the host (a warning is
  printed when there were any), and SSH connection attempts that timed out while a guest
  booted are counted (paramiko's tracebacks for them are kept off the terminal).

The guest image is built once into ``--image-cache`` and copied into the state dir. With
``--state-dir``, use a dir that no other controller is using (the controller recovers and
reconciles whatever it finds there).
"""

from __future__ import annotations

from .cli import main

__all__ = ["main"]
