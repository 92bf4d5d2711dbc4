# ruff: noqa  (a one-off experiment, kept for the record; see docs/performance.md)
"""Experiment: Ulysses over symmetric memory (copy-engine pulls/pushes, head-group pipelining) vs NCCL.

    torchrun --nproc_per_node 4 benchmarks/p2p_experiment.py

Prints, on rank 0: copy-engine bandwidth against NCCL all-to-all, whether a copy overlaps a running
FA3 kernel, and per-call times (eager and CUDA graph, slowest rank's median) of prototype Ulysses
variants, each checked against ``ulysses_attention`` on the same inputs.
"""

from __future__ import annotations

import traceback

import torch
import torch.distributed as dist
import torch.distributed._symmetric_memory as symm_mem
from sweep import Timer

from attention import attention_with_lse, ulysses_attention
from xdit_core import init_distributed

BF16 = torch.bfloat16


def say(*a):
    if dist.get_rank() == 0:
        print(*a, flush=True)


def symmetric(numel: int, group, device):
    t = symm_mem.empty(numel, dtype=BF16, device=device)
    return t, symm_mem.rendezvous(t, group.group_name)


def ce_bandwidth(group, device, timer):
    P, me = group.size(), group.rank()
    for mb in (2, 8, 20):
        n = mb * 2**20 // 2
        buf, h = symmetric(P * n, group, device)
        buf.normal_()
        remote = [h.get_buffer(p, (n,), BF16, me * n) for p in range(P)]
        dst = torch.empty(P, n, dtype=BF16, device=device)
        streams = [torch.cuda.Stream() for _ in range(P)]
        main = torch.cuda.current_stream()

        def pull(nstreams):
            h.barrier(channel=0)
            for i in range(1, P):
                p = (me + i) % P
                s = streams[i % nstreams] if nstreams > 1 else main
                s.wait_stream(main)
                with torch.cuda.stream(s):
                    dst[p].copy_(remote[p])
            for s in streams:
                main.wait_stream(s)

        def pull_push_kernel():
            h.barrier(channel=0)
            for i in range(1, P):
                p = (me + i) % P
                dst[p].view(n // 128, 128)[:, :64].copy_(remote[p].view(n // 128, 128)[:, :64])
                dst[p].view(n // 128, 128)[:, 64:].copy_(remote[p].view(n // 128, 128)[:, 64:])

        send = torch.randn(P * n, dtype=BF16, device=device)
        recv = torch.empty_like(send)
        res = {
            "nccl a2a": timer(lambda: dist.all_to_all_single(recv, send, group=group)),
            "ce pull 1 stream": timer(lambda: pull(1)),
            "ce pull 3 streams": timer(lambda: pull(P)),
            "kernel pull (strided)": timer(pull_push_kernel),
        }
        ok = all(torch.equal(dst[p], h.get_buffer(p, (n,), BF16, me * n)) for p in range(P) if p != me)
        say(f"  {mb:3d} MiB per peer: " + ", ".join(f"{k} {v:.3f} ms" for k, v in res.items()) + f" (pull equal: {ok})")
        del remote, h, buf


def overlap_check(group, device, timer):
    P, me = group.size(), group.rank()
    S, h, D = 16896, 6, 128
    q, k, v = (torch.randn(1, S, h, D, dtype=BF16, device=device) for _ in range(3))
    n = 20 * 2**20 // 2
    buf, hd = symmetric(P * n, group, device)
    remote = [hd.get_buffer(p, (n,), BF16, me * n) for p in range(P)]
    dst = torch.empty(P, n, dtype=BF16, device=device)
    side = [torch.cuda.Stream() for _ in range(P)]
    main = torch.cuda.current_stream()

    def fa3():
        attention_with_lse(q, k, v, backend="fa3")

    def copies():
        hd.barrier(channel=0)
        for i in range(1, P):
            p = (me + i) % P
            side[i].wait_stream(main)
            with torch.cuda.stream(side[i]):
                dst[p].copy_(remote[p])
        for s in side:
            main.wait_stream(s)

    def both():
        hd.barrier(channel=0)
        for i in range(1, P):
            p = (me + i) % P
            side[i].wait_stream(main)
            with torch.cuda.stream(side[i]):
                dst[p].copy_(remote[p])
        fa3()
        for s in side:
            main.wait_stream(s)

    a, b, c = timer(fa3), timer(copies), timer(both)
    say(f"  FA3 [16896, 6 heads] {a:.3f} ms; CE pulls 3×20 MiB {b:.3f} ms; both at once {c:.3f} ms (sum {a + b:.3f})")


class CEUlysses:
    """Pull q/k/v head groups from the peers' packed send buffers, attend per group, push outputs."""

    def __init__(self, group, S_l, H, D, G, nstreams, device):
        P, me = group.size(), group.rank()
        self.P, self.me, self.G, self.S_l, self.H, self.D = P, me, G, S_l, H, D
        self.h = H // P // G
        blk = S_l * 3 * self.h * D
        self.send, self.send_h = symmetric(G * P * blk, group, device)
        oblk = S_l * self.h * D
        self.orecv, self.orecv_h = symmetric(P * G * oblk, group, device)
        self.pull_src = [
            [self.send_h.get_buffer(p, (blk,), BF16, (g * P + me) * blk) for p in range(P)] for g in range(G)
        ]
        self.push_dst = [
            [self.orecv_h.get_buffer(p, (oblk,), BF16, (me * G + g) * oblk) for p in range(P)] for g in range(G)
        ]
        self.streams = [torch.cuda.Stream() for _ in range(nstreams)]

    def __call__(self, q, k, v):
        P, me, G, S_l, h, D, H = self.P, self.me, self.G, self.S_l, self.h, self.D, self.H
        main = torch.cuda.current_stream()
        send = self.send.view(G, P, S_l, 3, h, D)
        parts = [x.view(S_l, P, G, h, D).permute(2, 1, 0, 3, 4) for x in (q, k, v)]
        torch.stack(parts, dim=3, out=send)
        self.send_h.barrier(channel=0)
        recv = torch.empty(G, P * S_l, 3, h, D, dtype=BF16, device=q.device)
        ns = len(self.streams)
        for s in self.streams:
            s.wait_stream(main)
        events = []
        for g in range(G):
            evs = []
            for i in range(P):
                p = (me + i) % P
                s = self.streams[i % ns]
                with torch.cuda.stream(s):
                    recv[g, p * S_l : (p + 1) * S_l].view(-1).copy_(self.pull_src[g][p])
            for s in self.streams:
                e = torch.cuda.Event()
                e.record(s)
                evs.append(e)
            events.append(evs)
        outs = []
        for g in range(G):
            for e in events[g]:
                main.wait_event(e)
            r = recv[g]
            o = attention_with_lse(r[:, 0].unsqueeze(0), r[:, 1].unsqueeze(0), r[:, 2].unsqueeze(0), backend="fa3")[0]
            outs.append(o)
            e = torch.cuda.Event()
            e.record(main)
            for i in range(P):
                p = (me + i) % P
                s = self.streams[i % ns]
                s.wait_event(e)
                with torch.cuda.stream(s):
                    self.push_dst[g][p].copy_(o[0, p * S_l : (p + 1) * S_l].reshape(-1))
        s0 = self.streams[0]
        for s in self.streams[1:]:
            s0.wait_stream(s)
        with torch.cuda.stream(s0):
            self.orecv_h.barrier(channel=1)
        main.wait_stream(s0)
        res = self.orecv.view(P, G, S_l, h, D).permute(2, 0, 1, 3, 4).reshape(1, S_l, H, D)
        return res


class KernelPushUlysses:
    """No packing, no staging: copy kernels write q/k/v heads and outputs straight into the peers' memory."""

    def __init__(self, group, S_l, H, D, device):
        P, me = group.size(), group.rank()
        self.P, self.me, self.S_l, self.H, self.D = P, me, S_l, H, D
        hp = self.hp = H // P
        blk = S_l * 3 * hp * D
        self.recv, self.recv_h = symmetric(P * blk, group, device)
        self.orecv, self.orecv_h = symmetric(S_l * H * D, group, device)
        self.dst = [self.recv_h.get_buffer(p, (S_l, 3, hp, D), BF16, me * blk) for p in range(P)]
        self.odst = [self.orecv_h.get_buffer(p, (S_l, H, D), BF16, 0) for p in range(P)]

    def __call__(self, q, k, v):
        P, me, S_l, hp, D = self.P, self.me, self.S_l, self.hp, self.D
        for i in range(P):
            p = (me + i) % P
            sl = slice(p * hp, (p + 1) * hp)
            torch.stack([q[0, :, sl], k[0, :, sl], v[0, :, sl]], dim=1, out=self.dst[p])
        self.recv_h.barrier(channel=0)
        r = self.recv.view(P * S_l, 3, hp, D)
        o = attention_with_lse(r[:, 0].unsqueeze(0), r[:, 1].unsqueeze(0), r[:, 2].unsqueeze(0), backend="fa3")[0]
        for i in range(P):
            p = (me + i) % P
            self.odst[p][:, me * hp : (me + 1) * hp].copy_(o[0, p * S_l : (p + 1) * S_l])
        self.orecv_h.barrier(channel=1)
        return self.orecv.view(1, S_l, self.H, D).clone()


WORD = torch.complex128  # 16-byte words: the copy kernels move 8 bf16 per load/store


def w(x):
    return x.view(WORD)


class CEUlysses2:
    """CEUlysses with a one-pass wide-word pack, pulls issued just ahead of use, pushes on a second stream."""

    def __init__(self, group, S_l, H, D, G, device, wide=True):
        P, me = group.size(), group.rank()
        self.P, self.me, self.G, self.S_l, self.H, self.D = P, me, G, S_l, H, D
        self.h = H // P // G
        self.wide = wide
        blk = S_l * 3 * self.h * D
        self.send, self.send_h = symmetric(G * P * blk, group, device)
        oblk = S_l * self.h * D
        self.orecv, self.orecv_h = symmetric(P * G * oblk, group, device)
        self.pull_src = [
            [self.send_h.get_buffer(p, (blk,), BF16, (g * P + me) * blk) for p in range(P)] for g in range(G)
        ]
        self.push_dst = [
            [self.orecv_h.get_buffer(p, (oblk,), BF16, (me * G + g) * oblk) for p in range(P)] for g in range(G)
        ]
        self.pull_stream, self.push_stream = torch.cuda.Stream(), torch.cuda.Stream()

    def __call__(self, q, k, v):
        P, me, G, S_l, h, D, H = self.P, self.me, self.G, self.S_l, self.h, self.D, self.H
        f = w if self.wide else (lambda x: x)
        main = torch.cuda.current_stream()
        send = self.send.view(G, P, S_l, 3, h, D)
        Dw = f(q).shape[-1]
        parts = [f(x).view(S_l, P, G, h, Dw).permute(2, 1, 0, 3, 4) for x in (q, k, v)]
        torch.stack(parts, dim=3, out=f(send))
        self.send_h.barrier(channel=0)
        recv = torch.empty(G, P * S_l, 3, h, D, dtype=BF16, device=q.device)
        pull, push = self.pull_stream, self.push_stream
        pull.wait_stream(main)
        push.wait_stream(main)

        def pulls(g):
            with torch.cuda.stream(pull):
                for i in range(P):
                    p = (me + i) % P
                    recv[g, p * S_l : (p + 1) * S_l].view(-1).copy_(self.pull_src[g][p])
            e = torch.cuda.Event()
            e.record(pull)
            return e

        ready = pulls(0)
        outs = []
        for g in range(G):
            main.wait_event(ready)
            r = recv[g]
            o = attention_with_lse(r[:, 0].unsqueeze(0), r[:, 1].unsqueeze(0), r[:, 2].unsqueeze(0), backend="fa3")[0]
            outs.append(o)
            done = torch.cuda.Event()
            done.record(main)
            if g + 1 < G:
                ready = pulls(g + 1)
            push.wait_event(done)
            with torch.cuda.stream(push):
                for i in range(P):
                    p = (me + i) % P
                    self.push_dst[g][p].copy_(o[0, p * S_l : (p + 1) * S_l].reshape(-1))
        push.wait_stream(pull)
        with torch.cuda.stream(push):
            self.orecv_h.barrier(channel=1)
        main.wait_stream(push)
        src = f(self.orecv.view(P, G, S_l, h, D)).permute(2, 0, 1, 3, 4)
        res = torch.empty(1, S_l, H, D, dtype=BF16, device=q.device)
        f(res).view(S_l, P, G, h, -1).copy_(src)
        return res


class KernelPush2(KernelPushUlysses):
    def __call__(self, q, k, v):
        P, me, S_l, hp = self.P, self.me, self.S_l, self.hp
        for i in range(P):
            p = (me + i) % P
            sl = slice(p * hp, (p + 1) * hp)
            torch.stack([w(q[0, :, sl]), w(k[0, :, sl]), w(v[0, :, sl])], dim=1, out=w(self.dst[p]))
        self.recv_h.barrier(channel=0)
        r = self.recv.view(P * S_l, 3, hp, self.D)
        o = attention_with_lse(r[:, 0].unsqueeze(0), r[:, 1].unsqueeze(0), r[:, 2].unsqueeze(0), backend="fa3")[0]
        for i in range(P):
            p = (me + i) % P
            w(self.odst[p][:, me * hp : (me + 1) * hp]).copy_(w(o[0, p * S_l : (p + 1) * S_l]))
        self.recv_h.barrier(channel=1)
        res = torch.empty(1, S_l, self.H, self.D, dtype=BF16, device=q.device)
        w(res).copy_(w(self.orecv.view(1, S_l, self.H, self.D)))
        return res


def pack_and_host(group, device, timer):
    import time

    P, me = group.size(), group.rank()
    S_l, H, D, G = 16896 // P, 24, 128, 2
    q, k, v = (torch.randn(1, S_l, H, D, device=device, dtype=BF16) for _ in range(3))
    send = torch.empty(G, P, S_l, 3, 1, H // P // G, D, device=device, dtype=BF16)
    ref = None
    for name, dt in (("bf16", None), ("int64", torch.int64), ("complex128", torch.complex128)):
        f = (lambda x: x) if dt is None else (lambda x, dt=dt: x.view(dt))
        Dw = f(q).shape[-1]
        parts = [f(x).view(S_l, P, G, H // P // G, Dw).permute(2, 1, 0, 3, 4).unsqueeze(3) for x in (q, k, v)]
        t = timer(lambda: torch.stack(parts, dim=3, out=f(send)))
        ref = send.clone() if ref is None else ref
        say(f"  pack [1,{S_l},24,128]x3 as {name}: {t:.3f} ms, equal {torch.equal(send, ref)}")
    buf, hd = symmetric(P * S_l * 1024, group, device)
    remote = hd.get_buffer((me + 1) % P, (S_l * 1024,), BF16, 0)
    local = torch.empty_like(remote)
    for name, fn in (
        ("copy_ local->local", lambda: local.copy_(q.view(-1)[: S_l * 1024])),
        ("copy_ peer->local", lambda: local.copy_(remote)),
        ("copy_ local->peer", lambda: remote.copy_(local)),
    ):
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        for _ in range(50):
            fn()
        t1 = time.perf_counter()
        torch.cuda.synchronize()
        say(f"  host time to issue {name}: {(t1 - t0) * 1e6 / 50:.1f} us")
    dist.barrier()


def ulysses_v2(group, device, timer):
    P = group.size()
    H, D = 24, 128
    for S in (4608, 16896):
        S_l = S // P
        gen = torch.Generator(device).manual_seed(S)
        q, k, v = (torch.randn(1, S_l, H, D, generator=gen, device=device, dtype=BF16) for _ in range(3))
        ref = ulysses_attention(q, k, v, group)
        base = timer(lambda: ulysses_attention(q, k, v, group))
        base_g = timer.graph(lambda: ulysses_attention(q, k, v, group))
        say(f"\n== S={S}: nccl ulysses eager {base:.3f} ms, graph {base_g:.3f} ms")
        variants = {"kernel push v2": lambda: KernelPush2(group, S_l, H, D, device)}
        for G in (1, 2, 3):
            variants[f"ce v2 G={G}"] = lambda G=G: CEUlysses2(group, S_l, H, D, G, device)
        variants["ce v2 G=2 narrow"] = lambda: CEUlysses2(group, S_l, H, D, 2, device, wide=False)
        for name, make in variants.items():
            fn = make()
            out = fn(q, k, v)
            err = (out.float() - ref.float()).abs().max()
            dist.all_reduce(err, op=dist.ReduceOp.MAX)
            t = timer(lambda: fn(q, k, v))
            tg = timer.graph(lambda: fn(q, k, v))
            out2 = fn(q, k, v)
            err2 = (out2.float() - ref.float()).abs().max()
            dist.all_reduce(err2, op=dist.ReduceOp.MAX)
            say(
                f"  {name:<24} eager {t:.3f} ms, graph {tg:.3f} ms, max |diff| vs nccl {err.item():.2e} / after {err2.item():.2e}"
            )
            del fn


def ulysses_variants(group, device, timer):
    P = group.size()
    H, D = 24, 128
    for S in (4608, 16896):
        S_l = S // P
        gen = torch.Generator(device).manual_seed(S)
        q, k, v = (torch.randn(1, S_l, H, D, generator=gen, device=device, dtype=BF16) for _ in range(3))
        ref = ulysses_attention(q, k, v, group)
        base = timer(lambda: ulysses_attention(q, k, v, group))
        base_g = timer.graph(lambda: ulysses_attention(q, k, v, group))
        say(f"\n== S={S}: nccl ulysses eager {base:.3f} ms, graph {base_g:.3f} ms")
        variants = {"kernel push G=1": lambda: KernelPushUlysses(group, S_l, H, D, device)}
        for G in (1, 2, 3, 6):
            for ns in (1, 3):
                variants[f"ce G={G} streams={ns}"] = lambda G=G, ns=ns: CEUlysses(group, S_l, H, D, G, ns, device)
        for name, make in variants.items():
            try:
                fn = make()
                out = fn(q, k, v)
                err = (out.float() - ref.float()).abs().max()
                dist.all_reduce(err, op=dist.ReduceOp.MAX)
                t = timer(lambda: fn(q, k, v))
                tg = timer.graph(lambda: fn(q, k, v))
                out2 = fn(q, k, v)
                err2 = (out2.float() - ref.float()).abs().max()
                dist.all_reduce(err2, op=dist.ReduceOp.MAX)
                say(
                    f"  {name:<24} eager {t:.3f} ms, graph {tg:.3f} ms, max |diff| vs nccl {err.item():.2e} / after {err2.item():.2e}"
                )
                del fn
            except Exception:
                say(f"  {name}: FAILED\n{traceback.format_exc()}")
                raise


def profile(group, device, timer):
    import os

    P = group.size()
    H, D, S = 24, 128, 16896
    S_l = S // P
    q, k, v = (torch.randn(1, S_l, H, D, device=device, dtype=BF16) for _ in range(3))
    variants = {
        "nccl": lambda q, k, v: ulysses_attention(q, k, v, group),
        "ce2": CEUlysses(group, S_l, H, D, 2, 1, device),
        "ce3": CEUlysses(group, S_l, H, D, 3, 1, device),
    }
    for h in (2, 3, 6):
        x = torch.randn(1, S, h, D, device=device, dtype=BF16)
        say(f"  FA3 [16896, {h} heads] {timer(lambda: attention_with_lse(x, x, x, backend='fa3')):.3f} ms")
    send = torch.empty(3, S_l, H, D, device=device, dtype=BF16)
    say(f"  pack copy {timer(lambda: torch.stack([q, k, v], out=send)):.3f} ms")
    for name, fn in variants.items():
        for _ in range(3):
            fn(q, k, v)
        torch.cuda.synchronize()
        dist.barrier()
        with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as prof:
            for _ in range(3):
                fn(q, k, v)
            torch.cuda.synchronize()
        if dist.get_rank() == 0:
            prof.export_chrome_trace(os.path.join(os.environ.get("OUT", "/tmp"), f"trace_{name}.json"))
        dist.barrier()


def profile_lib(group, device, timer):
    import os

    from xdit_core import PeerExchange

    P = group.size()
    H, D = 24, 128
    ex = PeerExchange(group)
    for S in (4608, 16896):
        S_l = S // P
        q, k, v = (torch.randn(1, S_l, H, D, device=device, dtype=BF16) for _ in range(3))
        proto = KernelPush2(group, S_l, H, D, device)
        variants = {
            "nccl": lambda: ulysses_attention(q, k, v, group),
            "peer": lambda: ulysses_attention(q, k, v, ex),
            "proto": lambda: proto(q, k, v),
        }
        for name, fn in variants.items():
            say(f"  S={S} {name}: eager {timer(fn):.3f} graph {timer.graph(fn):.3f}")
            for _ in range(3):
                fn()
            torch.cuda.synchronize()
            dist.barrier()
            with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as prof:
                for _ in range(3):
                    fn()
                torch.cuda.synchronize()
            if dist.get_rank() == 0:
                prof.export_chrome_trace(os.path.join(os.environ.get("OUT", "/tmp"), f"lib_{name}_{S}.json"))
            dist.barrier()


def main():
    ctx = init_distributed()
    device = ctx.device
    group = dist.group.WORLD
    say(f"torch {torch.__version__}, world {ctx.world_size}")
    try:
        symm_mem.enable_symm_mem_for_group(group.group_name)
    except Exception as e:
        say("enable_symm_mem_for_group:", repr(e))
    timer = Timer(device, warmup=3, iters=20, reps=7)
    import sys

    steps = {
        "ce bandwidth": ce_bandwidth,
        "overlap": overlap_check,
        "ulysses": ulysses_variants,
        "profile": profile,
        "pack": pack_and_host,
        "v2": ulysses_v2,
        "lib": profile_lib,
    }
    for name, fn in ((n, steps[n]) for n in sys.argv[1:] or steps):
        say(f"\n# {name}")
        try:
            fn(group, device, timer)
        except Exception:
            say(traceback.format_exc())
        torch.cuda.synchronize()
        dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
