"""Every benchmark in one run, its ratios in one table (`make bench`).

    python -m benchmarks [--quick] [--skip deploy memory ...] [--out runs/benchmarks]

- split samples/s over in-process samples/s on the simulation engine, by batch size
  (benchmarks/split_step.py), and seconds per message and per split step on the
  deployment engine, Flower's stock SuperNodes and the fast path
  (benchmarks/message_latency/split_deploy.py: SuperLink + SuperNodes with TLS and
  authentication);
- Ray rounds against the same local training of every client in a sequential loop,
  each in a fresh process (benchmarks/scale.py): round 1, later rounds, whole process;
- LoRA upload bytes over full-model bytes, for the quickstart model and a
  BART-base-sized one built from the config, and int8 split compression: bytes and
  the change in accuracy after a fixed budget (benchmarks/wire.py);
- seconds per round and peak memory of a 100- and a 1000-client simulation (10 clients
  train per round), the memory summed over every process it starts (benchmarks/scale.py);
- a training step with Sionna's channel over the same step with the previous
  hand-written channel, and 5G LDPC decoding time per information bit
  (benchmarks/phy.py).

Prints the table (Markdown) and writes bench.json and bench.png to --out (with
`--mlflow`, also as the artefacts of an MLflow run, common/tracking.py). Measured
numbers only: nothing here asserts a speed. The sizes are options; `--quick` shrinks
them all for a first look.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

from rich.console import Console
from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

SECTIONS = ("split", "deploy", "ray", "lora", "int8", "memory", "phy")
GB = 1024**3


def deploy_latency(supernodes: int, steps: int, messages: int) -> dict:
    """benchmarks/message_latency/split_deploy.py: seconds per message and per split
    step on SuperLink + SuperNodes (TLS, authentication), Flower's stock SuperNodes
    against the fast path (deploy.launch --fast). A failure is recorded, not raised,
    so that the other benchmarks still report."""
    try:
        from benchmarks.message_latency import split_deploy

        rows = split_deploy.measure(supernodes=supernodes, steps=steps, messages=messages)
        return {"supernodes": supernodes, "steps": steps, "messages": messages, "rows": rows,
                "table": split_deploy.table(rows), "error": ""}
    except Exception as err:  # noqa: BLE001 - reported in the table and the JSON
        return {"supernodes": supernodes, "steps": steps, "messages": messages, "rows": [],
                "error": f"{type(err).__name__}: {err}"[-1500:]}


def table(res: dict) -> str:
    lines = ["| measure | value | how |", "|---|---|---|"]
    for r in res.get("split", []):
        lines.append(f"| split / in-process samples/s, batch {r['batch']} (simulation) | "
                     f"{r['throughput_ratio_fast_dispatch']:.2f} | 1 client, Ray; "
                     f"{1e3 * r['simulation_fast_dispatch_s_per_step']:.0f} ms/step split, "
                     f"{1e3 * r['in_process_s_per_step']:.0f} ms in process; Flower's 0.1 s "
                     f"tick: {r['throughput_ratio_flower_tick']:.2f} |")
    dep = res.get("deploy")
    if dep:
        if not dep["rows"]:
            lines.append(f"| seconds per message (deployment) | failed | {dep['error'][-200:]!r} |")
        for r in dep["rows"]:
            how = (f"{dep['supernodes']} SuperNodes, TLS + auth; split run of {dep['steps']} "
                   f"steps, batch 16")
            lines.append(f"| seconds per split message (deployment), {r['setting']} SuperNodes | "
                         f"{r['split_s_per_message']:.2f} | {how}; a query message: "
                         f"{r['query_s_per_message']:.2f} s (first {r['query_first_s']:.2f} s) |")
            lines.append(f"| seconds per split step (deployment), {r['setting']} SuperNodes | "
                         f"{r['split_s_per_step']:.2f} | two exchanges and the server half's "
                         f"compute |")
    ray = res.get("ray")
    if ray and "later_rounds_ratio" in ray:
        r, q = ray["ray"], ray["loop"]
        how = (f"{ray['clients']} clients x {ray['rounds']} rounds, each in a fresh process; "
               f"Ray: 1 CPU and 1 torch thread per actor; loop: {ray['loop_torch_threads']} "
               "threads")
        lines.append(f"| Ray / loop, round 1 (server's round time) | {ray['round1_ratio']:.2f} | "
                     f"{r['round_s'][0]:.1f} s vs {q['round_s'][0]:.1f} s; {how} |")
        lines.append(f"| Ray / loop, process start to the end of round 1 | "
                     f"{ray['round1_from_start_ratio']:.2f} | "
                     f"{r['round_end_from_start_s'][0]:.1f} s vs "
                     f"{q['round_end_from_start_s'][0]:.1f} s |")
        lines.append(f"| Ray / loop, rounds 2-{ray['rounds']} | {ray['later_rounds_ratio']:.2f} | "
                     f"{sum(r['round_s'][1:]):.1f} s vs {sum(q['round_s'][1:]):.1f} s |")
        lines.append(f"| Ray / loop, whole process | {ray['process_ratio']:.2f} | "
                     f"{r['process_s']:.1f} s vs {q['process_s']:.1f} s |")
    elif ray:
        error = ray["ray"]["error"] or ray["loop"]["error"]
        lines.append(f"| Ray / loop | failed | {error[-200:]!r} |")
    for r in res.get("lora", []):
        lines.append(f"| LoRA upload / full-model bytes, {r['model']} | {r['ratio']:.4f} | "
                     f"{r['lora_upload_bytes'] / 1e6:.2f} MB of {r['full_model_bytes'] / 1e6:.1f}"
                     f" MB ({r['parameters'] / 1e6:.1f} M parameters, fp32) |")
    q = res.get("int8")
    if q:
        lines.append(f"| int8 / float32 split bytes per step | {q['bytes_ratio']:.3f} | "
                     f"activations and gradients, {q['clients']} clients |")
        lines.append(f"| int8 - float32 accuracy after {q['rounds']} rounds x "
                     f"{q['steps_per_round']} steps | {q['accuracy_change']:+.3f} | "
                     f"{q['float32']['accuracy']:.3f} -> {q['int8']['accuracy']:.3f}; PSNR "
                     f"{q['psnr_change_db']:+.2f} dB |")
    for m in res.get("memory", []):
        lines.append(f"| peak memory, {m['clients']}-client simulation (GB, PSS summed) | "
                     f"{m['peak_pss_sum_bytes'] / GB:.2f} | RSS summed "
                     f"{m['peak_rss_sum_bytes'] / GB:.2f} GB over {m['processes_at_peak']} "
                     f"processes; {m['wall_s']:.0f} s"
                     + ("" if m["returncode"] == 0 else f"; exit {m['returncode']}") + " |")
    mem = {m["clients"]: m for m in res.get("memory", []) if m.get("later_round_s")}
    for n, m in sorted(mem.items()):
        base = mem[min(mem)]
        lines.append(f"| seconds per round after the first, {n} clients, 10 train | "
                     f"{m['later_round_s']:.2f} | {m['later_round_s'] / base['later_round_s']:.2f}"
                     f"x the {min(mem)}-client federation's; round 1 (actor start-up) "
                     f"{m['round_s'][0]:.1f} s |")
    phy = res.get("phy")
    if phy:
        for r in phy["steps"]:
            if "ratio" in r:
                lines.append(f"| training step, Sionna / previous channel, {r['channel']} | "
                             f"{r['ratio']:.2f} | mtsc quickstart, batch {r['batch']}: "
                             f"{1e3 * r['sionna_s_per_step']:.0f} ms vs "
                             f"{1e3 * r['previous_s_per_step']:.0f} ms |")
            else:
                lines.append(f"| training step, Sionna {r['channel']} (ms) | "
                             f"{1e3 * r['sionna_s_per_step']:.0f} | OFDM grid, no previous "
                             "channel to compare with |")
        for r in phy["ldpc"]:
            lines.append(f"| LDPC decoding, {r['mcs']} (us per info bit) | "
                         f"{r['decode_us_per_info_bit']:.1f} | {r['blocks']} blocks of "
                         f"{r['payload_bits']} bits, 20 iterations; whole link "
                         f"{r['link_us_per_info_bit']:.1f} us/bit; BLER "
                         f"{r['bler_at_threshold']:.2f} at {r['threshold_snr_db']:g} dB |")
    return "\n".join(lines)


def plot(res: dict, path: Path) -> None:
    from common.records import plt

    fig, axes = plt.subplots(1, 4, figsize=(18, 4))
    a, b, c, d = axes
    if res.get("split"):
        batches = [r["batch"] for r in res["split"]]
        for key, label in (("fast_dispatch", "5 ms dispatch tick"),
                           ("flower_tick", "Flower's 0.1 s tick")):
            a.plot(batches, [r[f"throughput_ratio_{key}"] for r in res["split"]], "o-",
                   label=label)
        a.axhline(0.8, color="grey", ls=":", label="goal at batch 64: 0.8")
        a.set(xscale="log", xlabel="batch", ylabel="split / in-process samples/s",
              title="split throughput (simulation)")
        a.set_xticks(batches, [str(b) for b in batches])
        a.minorticks_off()
        a.legend()
    if res.get("deploy") and res["deploy"]["rows"]:
        rows = res["deploy"]["rows"]
        names = [r["setting"] for r in rows]
        for i, (key, label) in enumerate((("split_s_per_message", "split message"),
                                          ("split_s_per_step", "split step"))):
            b.bar([k + 0.4 * i for k in range(len(rows))], [r[key] for r in rows], 0.4,
                  label=label)
        b.set_xticks([k + 0.2 for k in range(len(rows))], names)
        b.set(yscale="log", ylabel="seconds", title="deployment engine (TLS + auth)")
        b.legend()
    elif (res.get("ray") or {}).get("later_rounds_ratio") is not None:
        ray = res["ray"]
        rounds = range(1, ray["rounds"] + 1)
        b.plot(rounds, ray["ray"]["round_s"], "o-", label="Ray (2 actors x 1 thread)")
        b.plot(rounds, ray["loop"]["round_s"], "s--",
               label=f"loop ({ray['loop_torch_threads']} threads)")
        b.set(yscale="log", xlabel="round", ylabel="seconds",
              title=f"Ray vs loop, {ray['clients']} clients")
        b.set_xticks(list(rounds))
        b.legend()
    bars = []
    for r in res.get("lora", []):
        bars.append((f"LoRA/full\n{r['model']}", r["ratio"]))
    if res.get("int8"):
        bars.append(("int8/fp32\nsplit bytes", res["int8"]["bytes_ratio"]))
    ray = res.get("ray") or {}
    for key, label in (("round1_ratio", "Ray/loop\nround 1"),
                       ("later_rounds_ratio", "Ray/loop\nrounds 2+"),
                       ("process_ratio", "Ray/loop\nprocess")):
        if key in ray:
            bars.append((label, ray[key]))
    for r in (res.get("phy") or {}).get("steps", []):
        if "ratio" in r:
            bars.append((f"Sionna/previous\n{r['channel']} step", r["ratio"]))
    if bars:
        c.bar([n for n, _ in bars], [v for _, v in bars])
        c.set(yscale="log", ylabel="ratio", title="ratios")
        c.tick_params(axis="x", labelsize=7)
    if res.get("memory"):
        ns = [str(m["clients"]) for m in res["memory"]]
        d.bar(ns, [m["peak_pss_sum_bytes"] / GB for m in res["memory"]], label="PSS summed")
        d.plot(ns, [m["peak_rss_sum_bytes"] / GB for m in res["memory"]], "o", color="k",
               label="RSS summed")
        d.axhline(8, color="grey", ls=":", label="8 GB")
        d.set(xlabel="virtual clients", ylabel="GB", title="peak memory, every process")
        d.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m benchmarks", description=__doc__.split("\n")[0])
    p.add_argument("--out", type=Path, default=ROOT / "runs" / "benchmarks")
    p.add_argument("--skip", nargs="*", default=[], choices=SECTIONS)
    p.add_argument("--quick", action="store_true", help="small sizes everywhere")
    p.add_argument("--batches", type=int, nargs="+", default=None)
    p.add_argument("--steps", type=int, default=None, help="split steps per measurement")
    p.add_argument("--clients", type=int, default=20, help="clients of Ray vs the loop")
    p.add_argument("--rounds", type=int, default=None, help="rounds of Ray vs the loop")
    p.add_argument("--memory-clients", type=int, nargs="+", default=[100, 1000])
    p.add_argument("--int8-rounds", type=int, default=None)
    p.add_argument("--int8-steps", type=int, default=8)
    p.add_argument("--deploy-supernodes", type=int, default=2)
    p.add_argument("--deploy-steps", type=int, default=None, help="split steps per setting")
    p.add_argument("--deploy-messages", type=int, default=None)
    p.add_argument("--mlflow", action="store_true",
                   help="also log bench.json / bench.png as the artefacts of an MLflow run "
                        "(experiment 'benchmarks')")
    p.add_argument("--tracking-uri", default=None,
                   help="MLflow's store (default: sqlite:///<parent of --out>/mlflow.db)")
    args = p.parse_args(argv)
    batches = args.batches or ([16, 64] if args.quick else [16, 64, 256])
    steps = args.steps or (8 if args.quick else 16)
    int8_rounds = args.int8_rounds or (2 if args.quick else 4)
    messages = args.deploy_messages or (3 if args.quick else 5)
    deploy_steps = args.deploy_steps or (2 if args.quick else 3)
    args.rounds = args.rounds or (3 if args.quick else 5)
    args.out.mkdir(parents=True, exist_ok=True)

    from benchmarks import phy, scale, split_step, wire

    jobs = {
        "split": lambda: split_step.measure(batches, steps),
        "deploy": lambda: deploy_latency(args.deploy_supernodes, deploy_steps, messages),
        "ray": lambda: scale.ray_vs_sequential(args.clients, args.rounds),
        "lora": lambda: [wire.lora_bytes("quickstart", []),
                         wire.lora_bytes("BART-base-sized", wire.BART_BASE)],
        "int8": lambda: wire.int8_compression(int8_rounds, args.int8_steps),
        "memory": lambda: [scale.simulation_memory(n) for n in args.memory_clients],
        "phy": lambda: {"steps": phy.training_step(10 if args.quick else 20),
                        "ldpc": phy.ldpc_decoding(40 if args.quick else 100)},
    }
    todo = [s for s in SECTIONS if s not in args.skip]
    console = Console(stderr=True)
    res: dict = {"started": time.strftime("%Y-%m-%dT%H:%M:%S"), "seconds": {}}
    t_all = time.perf_counter()
    with Progress(TextColumn("[bold blue]{task.description}"), BarColumn(),
                  TextColumn("{task.completed}/{task.total}"), TimeElapsedColumn(),
                  console=console) as progress:
        bar = progress.add_task("benchmarks", total=len(todo))
        for name in todo:
            progress.update(bar, description=f"benchmark: {name}")
            t0 = time.perf_counter()
            res[name] = jobs[name]()
            res["seconds"][name] = time.perf_counter() - t0
            (args.out / "bench.json").write_text(json.dumps(res, indent=2))  # keep what ran
            progress.advance(bar)
    res["seconds"]["total"] = time.perf_counter() - t_all
    res["table"] = table(res)
    (args.out / "bench.json").write_text(json.dumps(res, indent=2))
    plot(res, args.out / "bench.png")
    print(res["table"])
    console.print(f"{args.out / 'bench.json'}, {args.out / 'bench.png'}; "
                  f"{res['seconds']['total'] / 60:.1f} min")
    if args.mlflow:
        from common.tracking import log_report

        log_report({"name": "benchmarks", "output_dir": str(args.out.parent),
                    "tracking_uri": args.tracking_uri, "args": vars(args) | {
                        "out": str(args.out)}}, args.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
