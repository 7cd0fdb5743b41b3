"""GHN-Q: a graph hypernetwork that maps a network's op graph (+ a target bit width) to its parameters.

GHN-2-style (Knyazev et al. 2021), written for this project:
1. Node embedding: op-kind embedding + kernel-size embedding + a linear encoding of the node's shapes
   (log channels in/out, log spatial size, stride, groups).
2. Gated GNN: one GRU cell shared by all nodes; a forward sweep over the graph (level by level in
   topological order, every node of a level updated at once, across all graphs of a batch), then a
   backward sweep over the reversed graph. Messages come from direct predecessors through one MLP and
   from virtual edges (shortest-path distance 2..hops) through another MLP, scaled by 1/distance.
3. Decoder: [node embedding, bit-width embedding] → MLP → a (dec_hidden × K × K) spatial map (center
   cropped to the kernel) → mixed by a fixed-size (D_out × D_in × dec_hidden) channel table into a
   D_out × D_in × k × k block, computed only for the channels a layer needs. Larger layers tile the block
   with a fixed pseudo-random sign pattern on every tile but the first, so wide layers (MBConv
   expansions) are not rank-deficient copies. Each weight tensor is standardized and scaled by
   g·sqrt(1/fan_in) (fan-in normalization as in GHN-2, plus standardization and a learned per-layer
   gain g: with a CPU-sized budget the GHN cannot afford hundreds of steps just growing the output
   scale); biases are tanh(0.2·b) as in GHN-2.
"""

from __future__ import annotations

import math
from collections import deque
from dataclasses import asdict, dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ghnq.cli import UserError
from ghnq.graph import KIND_INDEX, KINDS, PARAM_KINDS, Graph

BITS = ("float", "8", "4", "2")  # decoder conditioning; "float" = no quantization
KERNEL_SIZES = (1, 3, 5, 7)
N_FEATS = 7


def bits_key(bits: int | str | None) -> str:
    """Normalize a bit-width argument: 8, "8", "float", None (= float), 32 (= float)."""
    key = "float" if bits is None or str(bits).lower() in ("float", "fp32", "32", "none") else str(bits)
    if key not in BITS:
        raise UserError(f"bits: got {bits!r}; allowed: {', '.join(BITS)}")
    return key


def bits_int(bits: int | str | None) -> int | None:
    key = bits_key(bits)
    return None if key == "float" else int(key)


@dataclass
class GHNConfig:
    hidden: int = 64         # node embedding size
    dec_hidden: int = 64     # channels of the decoder's spatial map
    dec_out: int = 64        # D_out × D_in: the fixed block every weight is sliced / tiled from
    dec_in: int = 64
    kernel: int = 7          # largest kernel the decoder produces directly
    hops: int = 50           # virtual edges up to this shortest-path distance
    passes: int = 1          # forward+backward sweeps

    def to_dict(self) -> dict:
        return asdict(self)


# ----------------------------------------------------------------------------------------------------
# Graph batching (no learnable parts)


@dataclass
class GraphBatch:
    graphs: list[Graph]
    offsets: list[int]
    kind: Tensor           # [N] op kind index
    ksize: Tensor          # [N] kernel-size index (len(KERNEL_SIZES) = other / none)
    feats: Tensor          # [N, N_FEATS] shape features
    adj: Tensor            # [N, N] adj[d, s] = 1 for an edge s → d
    virt: Tensor           # [N, N] virt[d, s] = 1/dist(s, d) for 2 <= dist <= hops
    fwd_levels: list[Tensor]
    bwd_levels: list[Tensor]

    def to(self, device: torch.device | str) -> GraphBatch:
        return GraphBatch(self.graphs, self.offsets, self.kind.to(device), self.ksize.to(device),
                          self.feats.to(device), self.adj.to(device), self.virt.to(device),
                          [t.to(device) for t in self.fwd_levels], [t.to(device) for t in self.bwd_levels])


def _levels(n: int, edges: list[tuple[int, int]]) -> list[int]:
    """Longest-path depth of each node (edges go from lower to higher index in execution order)."""
    level = [0] * n
    for s, d in sorted(edges, key=lambda e: e[1]):
        level[d] = max(level[d], level[s] + 1)
    return level


def _distances(n: int, edges: list[tuple[int, int]], hops: int) -> list[tuple[int, int, int]]:
    """(src, dst, dist) for every directed shortest path of length 2..hops (BFS from every node)."""
    succ: list[list[int]] = [[] for _ in range(n)]
    for s, d in edges:
        succ[s].append(d)
    out = []
    for src in range(n):
        dist = {src: 0}
        queue = deque([src])
        while queue:
            u = queue.popleft()
            if dist[u] >= hops:
                continue
            for v in succ[u]:
                if v not in dist:
                    dist[v] = dist[u] + 1
                    queue.append(v)
                    if dist[v] >= 2:
                        out.append((src, v, dist[v]))
    return out


def _node_features(g: Graph) -> tuple[list[int], list[int], list[list[float]]]:
    kinds, ks, feats = [], [], []
    for node in g.nodes:
        kinds.append(KIND_INDEX[node.kind])
        ks.append(KERNEL_SIZES.index(node.kernel) if node.kind in PARAM_KINDS and node.kernel in KERNEL_SIZES
                  else len(KERNEL_SIZES))
        fan_in = (node.in_ch // max(1, node.groups)) * node.kernel ** 2
        feats.append([math.log2(node.out_ch + 1) / 8, math.log2(node.in_ch + 1) / 8, math.log2(node.hw + 1) / 8,
                      float(node.stride > 1), float(node.groups > 1), math.log2(fan_in + 1) / 12,
                      float("bias" in node.params)])
    return kinds, ks, feats


def collate(graphs: list[Graph], hops: int) -> GraphBatch:
    """Merge graphs into one block-diagonal graph with shared level lists."""
    offsets, kinds, ks, feats = [], [], [], []
    total = 0
    for g in graphs:
        offsets.append(total)
        k, s, f = _node_features(g)
        kinds += k
        ks += s
        feats += f
        total += len(g.nodes)
    adj = torch.zeros(total, total)
    virt = torch.zeros(total, total)
    fwd: dict[int, list[int]] = {}
    bwd: dict[int, list[int]] = {}
    for g, off in zip(graphs, offsets, strict=True):
        n = len(g.nodes)
        if g.edges:
            e = torch.tensor(g.edges) + off
            adj[e[:, 1], e[:, 0]] = 1.0
        ve = _distances(n, g.edges, hops)
        if ve:  # one indexed write: per-element tensor writes cost ~10 µs each, thousands per graph
            v = torch.tensor(ve)
            virt[v[:, 1] + off, v[:, 0] + off] = 1.0 / v[:, 2].float()
        for i, lv in enumerate(_levels(n, g.edges)):
            fwd.setdefault(lv, []).append(i + off)
        rev = [(n - 1 - d, n - 1 - s) for s, d in g.edges]  # reversed graph, reindexed to stay topological
        for i, lv in enumerate(_levels(n, rev)):
            bwd.setdefault(lv, []).append(n - 1 - i + off)
    return GraphBatch(graphs, offsets, torch.tensor(kinds), torch.tensor(ks), torch.tensor(feats),
                      adj, virt, [torch.tensor(fwd[k]) for k in sorted(fwd)],
                      [torch.tensor(bwd[k]) for k in sorted(bwd)])


# ----------------------------------------------------------------------------------------------------
# The hypernetwork


def _mlp(i: int, h: int, o: int) -> nn.Sequential:
    return nn.Sequential(nn.Linear(i, h), nn.ReLU(), nn.Linear(h, o))


class GHNQ(nn.Module):
    def __init__(self, config: GHNConfig | None = None):
        super().__init__()
        c = self.config = config or GHNConfig()
        H = c.hidden
        self.kind_emb = nn.Embedding(len(KINDS), H)
        self.ksize_emb = nn.Embedding(len(KERNEL_SIZES) + 1, H)
        self.shape_enc = nn.Linear(N_FEATS, H)
        self.msg = _mlp(H, H, H)
        self.msg_virtual = _mlp(H, H // 2, H)
        self.gru = nn.GRUCell(H, H)
        self.norm = nn.LayerNorm(H)
        self.bits_emb = nn.Embedding(len(BITS), H)
        self.dec_in = _mlp(2 * H, H, H)
        self.dec_spatial = nn.Linear(H, c.dec_hidden * c.kernel * c.kernel)
        self.dec_channel = nn.Parameter(torch.randn(c.dec_out, c.dec_in, c.dec_hidden) / math.sqrt(c.dec_hidden))
        self.dec_bias = nn.Linear(H, c.dec_out)
        self.dec_gain = nn.Linear(H, 1)  # per-layer log-scale on top of the standardized weights
        for lin in (self.dec_bias, self.dec_gain):
            nn.init.zeros_(lin.weight)
            nn.init.zeros_(lin.bias)

    # -- graph encoder ---------------------------------------------------------------------------------
    def embed(self, batch: GraphBatch) -> Tensor:
        h = self.kind_emb(batch.kind) + self.ksize_emb(batch.ksize) + self.shape_enc(batch.feats)
        sweep = self._sweep if torch.is_grad_enabled() else self._sweep_inference
        for _ in range(self.config.passes):
            for levels, adj, virt in ((batch.fwd_levels, batch.adj, batch.virt),
                                      (batch.bwd_levels, batch.adj.t(), batch.virt.t())):
                h = sweep(h, levels, adj, virt)
        return self.norm(h)

    def _sweep(self, h: Tensor, levels: list[Tensor], adj: Tensor, virt: Tensor) -> Tensor:
        """One GRU sweep, level by level: messages of already-updated nodes (sources precede targets)."""
        m_real, m_virt = self.msg(h), self.msg_virtual(h)
        for idx in levels:
            h_new = self.gru(adj[idx] @ m_real + virt[idx] @ m_virt, h[idx])
            h = h.index_copy(0, idx, h_new)  # out of place: autograd keeps every level's state
            m_real = m_real.index_copy(0, idx, self.msg(h_new))
            m_virt = m_virt.index_copy(0, idx, self.msg_virtual(h_new))
        return h

    def _sweep_inference(self, h: Tensor, levels: list[Tensor], adj: Tensor, virt: Tensor) -> Tensor:
        """`_sweep` without autograd, same numbers. The sweep is sequential over the graph's depth (~70 levels for
        ResNet-20) and each level's ops are tiny, so per-op overhead is the cost on a CPU: both message MLPs share
        one first matmul, real and virtual edges one (N, 2N) aggregation matrix, and updates are in place."""
        n, hid = len(h), self.config.hidden
        w1 = torch.cat([self.msg[0].weight, self.msg_virtual[0].weight])
        b1 = torch.cat([self.msg[0].bias, self.msg_virtual[0].bias])
        (w_real, b_real), (w_virt, b_virt) = ((m[2].weight, m[2].bias) for m in (self.msg, self.msg_virtual))
        gru_w = (self.gru.weight_ih, self.gru.weight_hh, self.gru.bias_ih, self.gru.bias_hh)

        def messages(x: Tensor) -> tuple[Tensor, Tensor]:
            z = F.relu(F.linear(x, w1, b1))
            return F.linear(z[:, :hid], w_real, b_real), F.linear(z[:, hid:], w_virt, b_virt)

        agg = torch.cat([adj, virt], 1)      # [N, 2N]: row d = real then virtual sources of d
        msgs = torch.cat(messages(h))         # [2N, H]: real messages, then virtual ones
        h = h.clone()
        for idx in levels:
            h_new = torch.gru_cell(agg[idx] @ msgs, h[idx], *gru_w)
            h[idx] = h_new
            m_real, m_virt = messages(h_new)
            msgs[idx], msgs[idx + n] = m_real, m_virt
        return h

    # -- decoder ---------------------------------------------------------------------------------------
    @staticmethod
    def _sign(rows: int, cols: int, r0: int, c0: int, device: torch.device) -> Tensor:
        """Fixed ±1 pattern for tiled copies (+1 on the first r0×c0 tile): a hash of (row, col), so the
        same position always gets the same sign whatever the layer's size (nothing cached)."""
        o = torch.arange(rows, device=device).view(-1, 1)
        i = torch.arange(cols, device=device).view(1, -1)
        x = (o * 0x9E3779B1 + i * 0x85EBCA77) & 0xFFFFFFFF
        x = ((x ^ (x >> 15)) * 0x2C1B3C6D) & 0xFFFFFFFF
        x = x ^ (x >> 12)
        s = 1.0 - 2.0 * (x & 1).float()
        s[:r0, :c0] = 1.0
        return s

    def decode(self, h: Tensor, bits: Tensor, shapes: list[tuple[int, ...]],
               picks: list[tuple[list[int] | None, list[int] | None]] | None = None
               ) -> tuple[list[Tensor], list[Tensor]]:
        """Weights of the given 2-D/4-D shapes (and biases of length shape[0]) for node embeddings h. With
        `picks`, layer n's weight is rows picks[n][0] / columns picks[n][1] of the decoded shape (a layer that
        reads its channels in another order than the GHN's view, `Node.in_index` / `Node.out_index`)."""
        c = self.config
        z = self.dec_in(torch.cat([h, self.bits_emb(bits)], 1))
        spatial = F.relu(self.dec_spatial(z)).view(len(h), c.dec_hidden, c.kernel, c.kernel)
        biases = torch.tanh(0.2 * self.dec_bias(z))
        gains = torch.exp(self.dec_gain(z)).squeeze(1)
        # Group nodes by the block they need, so each group is one batched matmul.
        groups: dict[tuple[int, int, int], list[int]] = {}
        for i, shape in enumerate(shapes):
            k = shape[2] if len(shape) == 4 else 1
            groups.setdefault((min(shape[0], c.dec_out), min(shape[1], c.dec_in), min(k, c.kernel)), []).append(i)
        blocks: list[Tensor | None] = [None] * len(shapes)
        for (o, i, k), idx in groups.items():
            lo = (c.kernel - k) // 2
            s = spatial[idx][:, :, lo:lo + k, lo:lo + k].flatten(2)              # G, dh, k*k
            blk = torch.einsum("oid,gdp->goip", self.dec_channel[:o, :i], s)     # G, o, i, k*k
            for j, n in enumerate(idx):
                blocks[n] = blk[j]
        weights, out_biases = [], []
        for n, shape in enumerate(shapes):
            blk = blocks[n]
            o, i, kk = blk.shape
            out, inp = shape[0], shape[1]
            k = shape[2] if len(shape) == 4 else 1
            w = blk
            if out > o or inp > i:
                w = w.repeat(math.ceil(out / o), math.ceil(inp / i), 1)[:out, :inp]
                w = w * self._sign(out, inp, o, i, w.device).unsqueeze(-1)
            b = biases[n].repeat(math.ceil(out / c.dec_out))[:out]
            rows, cols = picks[n] if picks else (None, None)
            if rows is not None:
                w, b = w[rows], b[rows]
            if cols is not None:
                w = w[:, cols]
            out, inp = w.shape[0], w.shape[1]
            w = w.reshape(out, inp, math.isqrt(kk), math.isqrt(kk))
            if k > c.kernel:  # larger kernels than the decoder block: tile spatially
                w = w.repeat(1, 1, math.ceil(k / c.kernel), math.ceil(k / c.kernel))[:, :, :k, :k]
            # Standardize, then fan-in scale: every predicted layer starts like a He/LeCun-initialized one and
            # the GHN learns shapes, not magnitudes (scale is learned per layer by dec_gain).
            if len(shape) == 2:
                # Fully connected layers (the classifier) read pooled post-ReLU features, whose large common
                # mean turns any row-mean of W into a constant per-class logit offset: the GHN then learns
                # to shrink the classifier to uniform logits (measured: loss stuck at ln 10). Trained
                # classifiers have ~zero row means (ResNet-20 SGD: 4.5 % of the weight std), so center rows.
                w = w - w.mean(1, keepdim=True)
            w = (w - w.mean()) / (w.std(unbiased=False) + 1e-6) * (gains[n] * math.sqrt(1.0 / (inp * k * k)))
            weights.append(w.reshape((out, inp, *shape[2:])))
            out_biases.append(b)
        return weights, out_biases

    def forward(self, batch: GraphBatch, bits: list[str]) -> list[dict[str, Tensor]]:
        """Predicted parameters {"module.weight": tensor, "module.bias": tensor} for each graph."""
        h = self.embed(batch)
        rows, bit_idx, shapes, picks, names = [], [], [], [], []
        for gi, (g, off) in enumerate(zip(batch.graphs, batch.offsets, strict=True)):
            for ni in g.param_nodes():
                node = g.nodes[ni]
                rows.append(ni + off)
                bit_idx.append(BITS.index(bits[gi]))
                shape = node.params["weight"]
                if node.out_index is not None:
                    shape = (max(node.out_index) + 1, *shape[1:])
                if node.in_index is not None:
                    shape = (shape[0], max(node.in_index) + 1, *shape[2:])
                shapes.append(shape)
                picks.append((node.out_index, node.in_index))
                names.append((gi, node))
        out: list[dict[str, Tensor]] = [{} for _ in batch.graphs]
        if not rows:
            return out
        device = h.device
        weights, biases = self.decode(h[torch.tensor(rows, device=device)], torch.tensor(bit_idx, device=device),
                                      shapes, picks)
        for (gi, node), w, b in zip(names, weights, biases, strict=True):
            if node.flatten_area > 1:  # Linear(C) after a global average pool, as one Linear(C·H·W)
                w = w.repeat_interleave(node.flatten_area, dim=1) / node.flatten_area
            out[gi][node.module + ".weight"] = w
            if "bias" in node.params:
                out[gi][node.module + ".bias"] = b
        return out
