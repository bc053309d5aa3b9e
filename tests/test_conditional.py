"""Conditional attribution and concepts (relevances, graph, atlas)."""

import os

import pytest
import torch
from torch import nn

import attrax as ax
from conftest import assert_unchanged, module_snapshot

D = torch.float64


class Plain(nn.Module):
    def __init__(self):
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv2d(2, 6, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2), nn.Conv2d(6, 5, 3, padding=1), nn.BatchNorm2d(5), nn.ReLU()
        )
        self.head = nn.Sequential(nn.AdaptiveAvgPool2d(2), nn.Flatten(), nn.Linear(20, 4))

    def forward(self, x):
        return self.head(self.features(x))


class Skip(nn.Module):
    """A residual block around `inner` (conv-relu); `detach_skip` keeps the forward but cuts the skip
    from attribution, i.e. the same model with the skip path removed from the explanation."""

    def __init__(self, detach_skip=False):
        super().__init__()
        self.detach_skip = detach_skip
        self.stem = nn.Sequential(nn.Conv2d(2, 4, 3, padding=1), nn.ReLU())
        self.inner = nn.Sequential(nn.Conv2d(4, 4, 3, padding=1), nn.ReLU())
        self.post = nn.ReLU()
        self.head = nn.Sequential(nn.Conv2d(4, 3, 3, padding=1), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(3, 4))

    def forward(self, x):
        h = self.stem(x)
        skip = h.detach() if self.detach_skip else h
        h = self.post(self.inner(h) + skip)
        return self.head(h)


def make(cls, *args):
    torch.manual_seed(0)
    m = cls(*args).double().eval()
    for mod in m.modules():
        if isinstance(mod, nn.BatchNorm2d):
            mod.running_mean.normal_(0, 0.1)
            mod.running_var.uniform_(0.5, 1.5)
    return m


X = torch.randn(3, 2, 8, 8, dtype=D, generator=torch.Generator().manual_seed(1))
T = torch.tensor([0, 3, 1])


@pytest.mark.parametrize("layer, channels", [("features.1", 6), ("features.3", 5), ("features.4", 5)])
def test_channel_heatmaps_sum_to_the_unconditional_one(layer, channels):
    m = make(Plain)
    f, p = ax.functionalize(m)
    before = module_snapshot(m)
    heat = ax.conditional(f, p, X, T, [{layer: [c]} for c in range(channels)])
    assert heat.shape == (channels, *X.shape)
    torch.testing.assert_close(heat.sum(0), ax.lrp(f, p, X, T), rtol=1e-5, atol=1e-10)
    assert_unchanged(m, before)


@pytest.mark.parametrize("exclude_parallel", [True, False])
def test_channel_sum_with_skip_connections_at_a_cut(exclude_parallel):
    # after the residual sum every path goes through `post`, so the sum over its channels is exact
    m = make(Skip)
    f, p = ax.functionalize(m)
    comp = ax.composites.epsilon_plus()
    heat = ax.conditional(f, p, X, T, [{"post": [c]} for c in range(4)], composite=comp, exclude_parallel=exclude_parallel)
    torch.testing.assert_close(heat.sum(0), ax.lrp(f, p, X, T, composite=comp), rtol=1e-5, atol=1e-10)


def test_exclude_parallel_equals_the_model_without_the_skip_path():
    skip, cut = make(Skip), make(Skip, True)
    fs, ps = ax.functionalize(skip)
    fc, pc = ax.functionalize(cut)
    torch.testing.assert_close(fs(ps, X), fc(pc, X))
    conds = [{"inner": [c]} for c in range(4)] + [{"inner": [0, 2]}]
    excluded = ax.conditional(fs, ps, X, T, conds)
    reference = ax.conditional(fc, pc, X, T, conds)
    torch.testing.assert_close(excluded, reference, rtol=1e-10, atol=1e-12)
    # without exclusion the skip path's relevance leaks into every conditional heatmap
    leaky = ax.conditional(fs, ps, X, T, conds, exclude_parallel=False)
    through_skip = ax.lrp(fs, ps, X, T) - ax.lrp(fc, pc, X, T)
    assert through_skip.abs().max() > 1e-3
    for k in range(len(conds)):
        torch.testing.assert_close(leaky[k] - excluded[k], through_skip, rtol=1e-8, atol=1e-12)


def test_conditions_over_several_layers():
    m = make(Plain)
    f, p = ax.functionalize(m)
    both = ax.conditional(f, p, X, T, [{"features.4": [1], "features.1": [c]} for c in range(6)])
    only_top = ax.conditional(f, p, X, T, [{"features.4": [1]}])
    torch.testing.assert_close(both.sum(0), only_top[0], rtol=1e-6, atol=1e-12)


def test_vmapped_conditions_equal_a_loop_and_chunking_is_invariant():
    m = make(Plain)
    f, p = ax.functionalize(m)
    conds = [{"features.3": [c]} for c in range(5)] + [{"features.1": [0, 1, 5]}, {"features.4": [2], "features.1": [3]}]
    together = ax.conditional(f, p, X, T, conds)
    loop = torch.cat([ax.conditional(f, p, X, T, [c]) for c in conds])
    torch.testing.assert_close(together, loop, rtol=1e-12, atol=1e-14)
    for cs in (1, 3):
        torch.testing.assert_close(ax.conditional(f, p, X, T, conds, chunk_size=cs), together, rtol=1e-12, atol=1e-14)


def test_reused_module_is_conditioned_at_every_call_site():
    class Reused(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv1, self.conv2 = nn.Conv2d(2, 3, 3, padding=1), nn.Conv2d(3, 3, 3, padding=1)
            self.act = nn.ReLU()
            self.fc = nn.Linear(3, 2)

        def forward(self, x):
            h = self.act(self.conv2(self.act(self.conv1(x))))
            return self.fc(h.mean((2, 3)))

    m = make(Reused)
    f, p = ax.functionalize(m)
    from attrax.conditional import layer_nodes
    from attrax.rewrite import program_for

    assert len(layer_nodes(program_for(f, p, (X,)), "act")) == 2  # one module, two call sites
    everything = ax.conditional(f, p, X, 1, [{"act": [0, 1, 2]}])
    torch.testing.assert_close(everything[0], ax.lrp(f, p, X, 1))
    # channel c kept at both sites equals conditioning the two convolutions that feed them on c
    for c in range(3):
        torch.testing.assert_close(
            ax.conditional(f, p, X, 1, [{"act": [c]}]), ax.conditional(f, p, X, 1, [{"conv1": [c], "conv2": [c]}])
        )


@pytest.mark.parametrize(
    "conditions, exc, match",
    [
        ({"features.1": [0]}, TypeError, "conditions must be a non-empty list"),
        ([], TypeError, "conditions must be a non-empty list"),
        ([{"nope": [0]}], ValueError, "layer 'nope' is neither a module path nor a node"),
        ([{"features.1": [9]}], ValueError, r"channels \[9\] outside \[0, 6\)"),
        ([{"features.1": ["a"]}], TypeError, "list of channel indices"),
    ],
)
def test_bad_conditions(conditions, exc, match):
    f, p = ax.functionalize(make(Plain))
    with pytest.raises(exc, match=match):
        ax.conditional(f, p, X, T, conditions)


def test_batchnorm_folded_into_a_conv_can_still_be_named():
    m = make(Plain)
    f, p = ax.functionalize(m)
    by_bn = ax.conditional(f, p, X, T, [{"features.4": [2]}])
    by_conv = ax.conditional(f, p, X, T, [{"features.3": [2]}])
    torch.testing.assert_close(by_bn, by_conv)  # folded: the BatchNorm output is the merged conv's output


# --------------------------------------------------------------------------- concepts


def test_relevances_are_the_channel_sums_of_conditional_heatmaps():
    torch.manual_seed(2)
    m = nn.Sequential(nn.Conv2d(2, 4, 3, padding=1, bias=False), nn.ReLU(), nn.Conv2d(4, 3, 3, bias=False), nn.ReLU(),
                      nn.Flatten(), nn.Linear(3 * 36, 2, bias=False)).double().eval()
    f, p = ax.functionalize(m)
    comp = ax.composites.mapping(by_type={ax.composites.Kind("layer"): ax.rules.Epsilon(1e-12)})
    rel = ax.concepts.relevances(f, p, X, 1, "3", composite=comp)
    assert rel.shape == (3, 3)
    heat = ax.conditional(f, p, X, 1, [{"3": [c]} for c in range(3)], composite=comp)
    torch.testing.assert_close(rel, heat.flatten(2).sum(2).T, rtol=1e-8, atol=1e-12)


def _bias_free_cnn():
    torch.manual_seed(4)
    return nn.Sequential(nn.Conv2d(2, 6, 3, padding=1, bias=False), nn.ReLU(), nn.Conv2d(6, 5, 3, bias=False), nn.ReLU(),
                         nn.Flatten(), nn.Linear(5 * 36, 4, bias=False)).double().eval()


@pytest.mark.parametrize("g", [lambda o: o[:, 0] - 0.5 * o[:, 2], lambda o: 2 * o[:, 1], lambda o: 3 * o[:, 1] + o[:, 0]],
                         ids=["difference", "scaled", "sum"])
def test_callable_targets_seed_out_times_their_gradient(g):
    # Issue 15.2: conditional attribution and concepts seed R_out = out * dg/dout (API.md section 2), so
    # the heatmaps of a partition of a layer's channels sum to g(out) for a linear g (they summed to
    # g(out) * sum(dg/dout): half of it for o0 - 0.5 o2, four times it for 3 o1 + o0)
    m = _bias_free_cnn()
    f, p = ax.functionalize(m)
    comp = ax.composites.mapping(by_type={ax.composites.Kind("layer"): ax.rules.Epsilon(1e-12)})
    with torch.no_grad():
        want = g(m(X))
    partition = [{"1": [0, 2, 4]}, {"1": [1, 3]}, {"1": [5]}]
    heat = ax.conditional(f, p, X, g, partition, composite=comp)
    torch.testing.assert_close(heat.sum(0), ax.lrp(f, p, X, g, composite=comp), rtol=1e-8, atol=1e-12)
    torch.testing.assert_close(heat.sum(0).flatten(1).sum(1), want, rtol=1e-6, atol=1e-10)
    for layer in ("1", "3"):  # channel relevances, also under a condition
        rel = ax.concepts.relevances(f, p, X, g, layer, composite=comp)
        torch.testing.assert_close(rel.sum(1), want, rtol=1e-6, atol=1e-10)
    cond = ax.concepts.relevances(f, p, X, g, "1", composite=comp, condition={"3": [0, 1, 2, 3, 4]})
    torch.testing.assert_close(cond.sum(1), want, rtol=1e-6, atol=1e-10)
    tree = ax.concepts.graph(f, p, X, g, "3", 1, "1", top_k=6, composite=comp)
    upper = ax.concepts.relevances(f, p, X, g, "3", composite=comp)[:, 1].sum()
    assert tree["relevance"] == pytest.approx(float(upper))
    assert sum(c["relevance"] for c in tree["children"]) == pytest.approx(float(upper), rel=1e-6)


def test_callable_target_equal_to_an_index_target():
    m = _bias_free_cnn()
    f, p = ax.functionalize(m)
    conds = [{"1": [c]} for c in range(6)]
    comp = ax.composites.epsilon_plus()
    torch.testing.assert_close(ax.conditional(f, p, X, lambda o: o.gather(1, T[:, None])[:, 0], conds, composite=comp),
                               ax.conditional(f, p, X, T, conds, composite=comp), rtol=1e-6, atol=1e-12)


def test_graph_ranks_lower_channels_by_conditional_relevance():
    m = make(Plain)
    f, p = ax.functionalize(m)
    g = ax.concepts.graph(f, p, X, T, "features.5", 2, "features.1", top_k=3)
    assert g["layer"] == "features.5" and g["channel"] == 2 and len(g["children"]) == 3
    cond = ax.concepts.relevances(f, p, X, T, "features.1", condition={"features.5": [2]}).sum(0)
    order = cond.abs().argsort(descending=True)[:3].tolist()
    assert [c["channel"] for c in g["children"]] == order
    assert all(isinstance(c["relevance"], float) for c in g["children"])


def brute_force(f, p, data, layer, k):
    xs = torch.cat(data)
    with torch.no_grad():
        t = f(p, xs).argmax(1)
    rel = ax.concepts.relevances(f, p, xs, t, layer)
    from attrax.conditional import layer_nodes
    from attrax.rewrite import forward, program_for

    prog = program_for(f, p, (xs,))
    act = forward(prog, p, (xs,))[layer_nodes(prog, layer)[-1]].flatten(2).amax(2)

    def top(v):  # ties to the earlier sample
        order = v.T.sort(dim=1, descending=True, stable=True).indices[:, :k]
        return torch.return_types.topk((v.T.gather(1, order), order))

    return top(rel), top(act)


def test_atlas_matches_brute_force():
    m = make(Plain)
    f, p = ax.functionalize(m)
    g = torch.Generator().manual_seed(3)
    data = [torch.randn(4, 2, 8, 8, dtype=D, generator=g) for _ in range(5)]
    result = ax.concepts.atlas(f, p, data, "features.5", top_k=3, progress=False)
    rel, act = brute_force(f, p, data, "features.5", 3)
    assert result.samples == 20
    torch.testing.assert_close(result.relevance.values, rel.values, rtol=1e-8, atol=1e-12)
    assert torch.equal(result.relevance.ids, rel.indices)
    torch.testing.assert_close(result.activation.values, act.values)
    assert torch.equal(result.activation.ids, act.indices)
    assert result.relevance.boxes.shape == (5, 3, 4)
    rf = ax.concepts.receptive_fields(f, p, data[0], "features.5")
    assert rf.shape == (16, 4)  # a 4x4 map; each position sees a window of the 8x8 input
    assert (rf[:, 1] > rf[:, 0]).all() and (rf[:, 3] > rf[:, 2]).all()


def test_receptive_fields_of_a_known_stack():
    net = nn.Sequential(nn.Conv2d(1, 2, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2), nn.Conv2d(2, 2, 3), nn.ReLU()).eval()
    f, p = ax.functionalize(net)
    x = torch.randn(1, 1, 8, 8)
    first = ax.concepts.receptive_fields(f, p, x, "1")  # 3x3 conv, padding 1
    assert first[0].tolist() == [0, 2, 0, 2] and first[9].tolist() == [0, 3, 0, 3] and first[63].tolist() == [6, 8, 6, 8]
    second = ax.concepts.receptive_fields(f, p, x, "4")  # pool 2 then 3x3: rows 0..5 of the pooled input's source
    assert second.tolist() == [[0, 7, 0, 7], [0, 7, 1, 8], [1, 8, 0, 7], [1, 8, 1, 8]]


class Interrupted(Exception):
    pass


def test_atlas_resumes_from_its_state_file(tmp_path):
    m = make(Plain)
    f, p = ax.functionalize(m)
    g = torch.Generator().manual_seed(4)
    data = [torch.randn(3, 2, 8, 8, dtype=D, generator=g) for _ in range(6)]
    full = ax.concepts.atlas(f, p, data, "features.3", top_k=2, progress=False)
    state = tmp_path / "atlas.pt"

    def dying():
        for i, b in enumerate(data):
            if i == 4:
                raise Interrupted
            yield b

    with pytest.raises(Interrupted):
        ax.concepts.atlas(f, p, dying(), "features.3", top_k=2, state_file=state, progress=False)
    assert os.path.exists(state) and not [n for n in os.listdir(tmp_path) if n.endswith(".tmp")]
    resumed = ax.concepts.atlas(f, p, data, "features.3", top_k=2, state_file=state, progress=False)
    assert resumed.samples == full.samples
    for key in ("relevance", "activation"):
        assert torch.equal(getattr(resumed, key).ids, getattr(full, key).ids)
        torch.testing.assert_close(getattr(resumed, key).values, getattr(full, key).values)
    with pytest.raises(ValueError, match="belongs to another walk"):
        ax.concepts.atlas(f, p, data, "features.1", top_k=2, state_file=state, progress=False)


# -------------------------------------------------------------------- zennit-crp parity


@pytest.mark.parametrize("arch", ["vgg", "resnet"])
@pytest.mark.parametrize("exclude_parallel", [True, False])
def test_zennit_crp_equivalence(arch, exclude_parallel):
    import copy

    from _peers import zennit

    zennit()
    crp = pytest.importorskip("crp.attribution")
    from zennit.canonizers import SequentialMergeBatchNorm
    from zennit.composites import EpsilonPlusFlat
    from zennit.torchvision import ResNetCanonizer

    from test_lrp import resnet_like, vgg_like

    model = vgg_like() if arch == "vgg" else resnet_like()
    layers = ["3", "7"] if arch == "vgg" else ["4.conv2", "4.bn2", "5.conv1", "3"]
    canon = SequentialMergeBatchNorm() if arch == "vgg" else ResNetCanonizer()
    f, p = ax.functionalize(model)
    x = torch.randn(1, 3, 16, 16, dtype=D, generator=torch.Generator().manual_seed(5))
    t = int(f(p, x).argmax())
    for layer in layers:
        ours = ax.conditional(f, p, x, t, [{layer: [c]} for c in range(4)], composite=ax.composites.epsilon_plus_flat(),
                              exclude_parallel=exclude_parallel)[:, 0].sum(1)
        attribution = crp.CondAttribution(copy.deepcopy(model))  # zennit-crp mutates the model it explains
        theirs = attribution(x.clone().requires_grad_(), [{"y": [t], layer: [c]} for c in range(4)],
                             EpsilonPlusFlat(canonizers=[canon]), exclude_parallel=exclude_parallel).heatmap
        torch.testing.assert_close(ours, theirs.detach(), rtol=1e-6, atol=1e-12)
