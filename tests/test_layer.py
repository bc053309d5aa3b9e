"""Layer attribution by splitting the traced graph."""

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import attrax as ax
from conftest import assert_unchanged, module_snapshot

D = torch.float64


class TinyCNN(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv1 = nn.Conv2d(2, 4, 3, padding=1)
        self.conv2 = nn.Conv2d(4, 3, 3)
        self.fc = nn.Linear(3 * 4 * 4, 5)

    def forward(self, x):
        h = F.softplus(self.conv1(x))
        h = torch.tanh(self.conv2(h))
        return self.fc(h.flatten(1))


def tiny():
    torch.manual_seed(0)
    return TinyCNN().double().eval()


X = torch.randn(3, 2, 6, 6, dtype=D, generator=torch.Generator().manual_seed(1))
T = torch.tensor([0, 4, 2])


def test_activation_and_node_names():
    m = tiny()
    f, p = ax.functionalize(m)
    torch.testing.assert_close(ax.layer.activation(f, p, X, "conv2"), m.conv2(F.softplus(m.conv1(X))))
    from attrax.rewrite import program_for

    softplus = [n.name for n in program_for(f, p, (X,)).nodes if n.packet == "softplus"][0]
    torch.testing.assert_close(ax.layer.activation(f, p, X, softplus), F.softplus(m.conv1(X)))


def test_grad_cam_equals_the_formula_by_hand():
    m = tiny()
    f, p = ax.functionalize(m)
    before = module_snapshot(m)
    # by hand: A = conv2 output, dy/dA by torch.autograd, weights = spatial mean, ReLU(sum_c w_c A_c)
    a = m.conv2(F.softplus(m.conv1(X))).detach().requires_grad_()
    y = m.fc(torch.tanh(a).flatten(1)).gather(1, T[:, None]).sum()
    (g,) = torch.autograd.grad(y, a)
    want = (g.mean((2, 3), keepdim=True) * a.detach()).sum(1, keepdim=True).clamp(min=0)
    got = ax.layer.grad_cam(f, p, X, T, "conv2")
    assert got.shape == (3, 1, 4, 4)
    torch.testing.assert_close(got, want)
    torch.testing.assert_close(ax.layer.grad_cam(f, p, X, T, "conv2", relu=False),
                               (g.mean((2, 3), keepdim=True) * a.detach()).sum(1, keepdim=True))
    torch.testing.assert_close(ax.layer.gradient_x_activation(f, p, X, T, "conv2"), g * a.detach())
    assert_unchanged(m, before)


def test_grad_cam_matches_captum_without_relu():
    ca = pytest.importorskip("captum.attr")
    m = tiny()
    f, p = ax.functionalize(m)
    theirs = ca.LayerGradCam(m, m.conv2).attribute(X.clone().requires_grad_(), target=T)
    torch.testing.assert_close(ax.layer.grad_cam(f, p, X, T, "conv2", relu=False), theirs, rtol=1e-6, atol=1e-10)


class Tokens(nn.Module):
    """(B, T, D) -> Linear inside a residual block -> mean over tokens: a transformer-shaped model."""

    def __init__(self):
        super().__init__()
        self.mlp, self.head = nn.Linear(5, 5), nn.Linear(5, 3)

    def forward(self, x):
        h = x + torch.relu(self.mlp(x))
        return self.head(h.mean(1))


def test_grad_cam_needs_a_channel_dim_on_token_layers():
    # issue 15 #7: on a (B, T, D) Linear output the old grad_cam took the T tokens for channels and returned
    # (B, 1, D); now it refuses, and channel_dim=-1 weights the D features and gives one value per token
    torch.manual_seed(1)
    m = Tokens().double().eval()
    f, p = ax.functionalize(m)
    x = torch.randn(2, 4, 5, dtype=D)
    for fn in (ax.layer.grad_cam, ax.layer.guided_grad_cam):
        with pytest.raises(ValueError, match=r"grad_cam needs a channel dim: layer 'mlp' has output shape \(2, 4, 5\)"):
            fn(f, p, x, 1, "mlp")
    a = m.mlp(x).detach().requires_grad_()
    (g,) = torch.autograd.grad(m.head((x + torch.relu(a)).mean(1))[:, 1].sum(), a)
    want = (g.mean(1, keepdim=True) * a.detach()).sum(2, keepdim=True)  # (B, T, 1)
    for cd in (-1, 2):
        torch.testing.assert_close(ax.layer.grad_cam(f, p, x, 1, "mlp", channel_dim=cd, relu=False), want)
    cam = ax.layer.grad_cam(f, p, x, 1, "mlp", channel_dim=-1)
    torch.testing.assert_close(cam, want.clamp(min=0))
    guided = ax.layer.guided_grad_cam(f, p, x, 1, "mlp", channel_dim=-1)  # the (B, T, 1) map broadcasts to x
    torch.testing.assert_close(guided, ax.guided_backprop(f, p, x, 1) * cam)
    for cd in (0, 3, -3):
        with pytest.raises(ValueError, match=f"channel_dim {cd} is out of range"):
            ax.layer.grad_cam(f, p, x, 1, "mlp", channel_dim=cd)


def test_grad_cam_accepts_conv_layouts_through_residuals_pooling_and_cat():
    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.stem, self.conv, self.side = nn.Conv2d(2, 4, 3, padding=1), nn.Conv2d(4, 4, 3, padding=1), nn.Conv1d(4, 2, 1)
            self.bn, self.pool, self.fc = nn.BatchNorm2d(4), nn.MaxPool2d(2), nn.Linear(6 * 9, 3)

        def forward(self, x):
            h = torch.relu(self.bn(self.conv(self.stem(x))) + self.stem(x))  # a residual block's output ...
            h = self.pool(h).flatten(2)  # ... pooled, then (B, C, L)
            return self.fc(torch.cat([h, self.side(h)], 1).flatten(1))

    torch.manual_seed(2)
    m = Net().double().eval()
    f, p = ax.functionalize(m)
    x = torch.randn(2, 2, 6, 6, dtype=D)
    from attrax.rewrite import program_for

    nodes = {n.packet: n.name for n in program_for(f, p, (x,)).nodes}
    for layer, shape in (("bn", (2, 1, 6, 6)), (nodes["relu"], (2, 1, 6, 6)), ("pool", (2, 1, 3, 3)),
                         ("side", (2, 1, 9)), (nodes["cat"], (2, 1, 9))):
        cam = ax.layer.grad_cam(f, p, x, 0, layer)
        assert cam.shape == shape, layer
        torch.testing.assert_close(ax.layer.grad_cam(f, p, x, 0, layer, channel_dim=1), cam)


def test_layer_ig_is_complete_at_the_layer_and_conductance_sums_to_it():
    m = tiny()
    f, p = ax.functionalize(m)
    b = torch.randn_like(X) * 0.2
    with torch.no_grad():
        span = f(p, X).gather(1, T[:, None])[:, 0] - f(p, b).gather(1, T[:, None])[:, 0]
    for layer in ("conv1", "conv2"):
        lig = ax.layer.integrated_gradients(f, p, X, T, layer, baseline=b, n_steps=64)
        assert lig.shape == ax.layer.activation(f, p, X, layer).shape
        torch.testing.assert_close(lig.flatten(1).sum(1), span, rtol=1e-6, atol=1e-10)
        cond = ax.layer.conductance(f, p, X, T, layer, baseline=b, n_steps=64)
        torch.testing.assert_close(cond.flatten(1).sum(1), lig.flatten(1).sum(1), rtol=1e-6, atol=1e-10)


def test_layer_ig_and_conductance_chunk_and_batch_invariance():
    m = tiny()
    f, p = ax.functionalize(m)
    for fn in (ax.layer.integrated_gradients, ax.layer.conductance):
        ref = fn(f, p, X, T, "conv1", n_steps=9)
        torch.testing.assert_close(fn(f, p, X, T, "conv1", n_steps=9, chunk_size=2), ref)
        torch.testing.assert_close(fn(f, p, X[1:2], T[1:2], "conv1", n_steps=9), ref[1:2])


def test_layer_with_a_bypass_uses_the_skip_value_at_x():
    class Res(nn.Module):
        def __init__(self):
            super().__init__()
            self.a, self.b = nn.Linear(3, 3), nn.Linear(3, 2)

        def forward(self, x):
            h = torch.tanh(self.a(x))
            return self.b(h + x)

    torch.manual_seed(4)
    m = Res().double().eval()
    f, p = ax.functionalize(m)
    x = torch.randn(2, 3, dtype=D)
    # d out / d h at x is b.weight: gradient x activation by hand
    h = torch.tanh(m.a(x))
    torch.testing.assert_close(ax.layer.gradient_x_activation(f, p, x, 1, "a"), (1 - h**2) * m.b.weight[1] * m.a(x))


def test_guided_grad_cam_shape_and_reused_module_error():
    m = tiny()
    f, p = ax.functionalize(m)
    assert ax.layer.guided_grad_cam(f, p, X.float().double(), T, "conv2").shape == X.shape

    class Twice(nn.Module):
        def __init__(self):
            super().__init__()
            self.lin = nn.Linear(3, 3)

        def forward(self, x):
            return self.lin(self.lin(x))

    f2, p2 = ax.functionalize(Twice().eval())
    with pytest.raises(ValueError, match="called 2 times"):
        ax.layer.activation(f2, p2, torch.randn(2, 3), "lin")
    with pytest.raises(ValueError, match="neither a module path nor a node"):
        ax.layer.activation(f2, p2, torch.randn(2, 3), "nope")
    with pytest.raises(TypeError, match="layer must be"):
        ax.layer.activation(f2, p2, torch.randn(2, 3), 3)


# ------------------------------------------------------------------ issue 18: Captum's layer options


def rg(x):
    return x.detach().clone().requires_grad_()


class Seq(nn.Module):
    """TinyCNN with module activations, so Captum can hook every layer."""

    def __init__(self):
        super().__init__()
        self.conv1, self.act = nn.Conv2d(2, 4, 3, padding=1), nn.Softplus()
        self.conv2, self.fc = nn.Conv2d(4, 3, 3), nn.Linear(3 * 4 * 4, 5)

    def forward(self, x):
        return self.fc(torch.tanh(self.conv2(self.act(self.conv1(x)))).flatten(1))


def seq():
    torch.manual_seed(0)
    return Seq().double().eval()


@pytest.mark.parametrize("to_input", [False, True])
def test_layer_methods_match_captum_on_layer_inputs_and_outputs(to_input):
    ca = pytest.importorskip("captum.attr")
    m = seq()
    f, p = ax.functionalize(m)
    b = torch.randn_like(X) * 0.2
    kw = {"attribute_to_layer_input": to_input}
    pairs = [
        (ax.layer.integrated_gradients(f, p, X, T, "conv2", baseline=b, n_steps=20, **kw),
         ca.LayerIntegratedGradients(m, m.conv2).attribute(rg(X), baselines=b, target=T, n_steps=20,
                                                            method="gausslegendre", **kw)),
        (ax.layer.gradient_x_activation(f, p, X, T, "conv2", **kw),
         ca.LayerGradientXActivation(m, m.conv2).attribute(rg(X), target=T, **kw)),
        (ax.layer.activation(f, p, X, "conv2", **kw), ca.LayerActivation(m, m.conv2).attribute(rg(X), **kw)),
        (ax.layer.grad_cam(f, p, X, T, "conv2", relu=False, **kw),
         ca.LayerGradCam(m, m.conv2).attribute(rg(X), target=T, **kw)),
    ]
    for ours, theirs in pairs:
        torch.testing.assert_close(ours, theirs.detach(), rtol=1e-6, atol=1e-9)
    # Captum's conductance takes finite differences of the layer between nodes k/n (riemann_trapezoid
    # with n + 1 nodes); on a layer affine in x (conv1's output, or its input x) that is our exact path
    # derivative with riemann_left nodes k/n, so the two agree exactly there
    ours, delta = ax.layer.conductance(f, p, X, T, "conv1", baseline=b, n_steps=12, method="riemann_left",
                                       return_convergence_delta=True, **kw)
    theirs, their_delta = ca.LayerConductance(m, m.conv1).attribute(
        rg(X), baselines=b, target=T, n_steps=12, method="riemann_trapezoid", return_convergence_delta=True, **kw)
    torch.testing.assert_close(ours, theirs.detach(), rtol=1e-6, atol=1e-10)
    torch.testing.assert_close(delta, their_delta.detach(), rtol=1e-6, atol=1e-10)


def test_layer_input_is_the_input_as_the_layers_call_sees_it():
    # the input of `c` also feeds a skip connection: attributing to it goes through `c` only, the skip keeps
    # its value at x (Captum's LayerIntegratedGradients replaces the input by a pre-hook, the same)
    class Skip(nn.Module):
        def __init__(self):
            super().__init__()
            self.a, self.c, self.head = nn.Linear(3, 4), nn.Linear(4, 4), nn.Linear(4, 2)

        def forward(self, x):
            h = self.a(x)
            return self.head(torch.tanh(self.c(h)) + h)

    torch.manual_seed(3)
    m = Skip().double().eval()
    f, p = ax.functionalize(m)
    x = torch.randn(3, 3, dtype=D)
    h = m.a(x).detach()
    g = ((1 - torch.tanh(m.c(h)) ** 2) * m.head.weight[1]) @ m.c.weight  # d out_1 / d h through c only
    torch.testing.assert_close(ax.layer.gradient_x_activation(f, p, x, 1, "c", attribute_to_layer_input=True),
                               (h * g).detach())
    ca = pytest.importorskip("captum.attr")
    b = torch.randn_like(x)
    torch.testing.assert_close(
        ax.layer.integrated_gradients(f, p, x, 1, "c", baseline=b, n_steps=10, attribute_to_layer_input=True),
        ca.LayerIntegratedGradients(m, m.c).attribute(rg(x), baselines=b, target=1, n_steps=10, method="gausslegendre",
                                                      attribute_to_layer_input=True).detach())


class Tok(nn.Module):
    """Token ids and segment ids -> two embeddings -> mean -> head (Captum's NLP recipe, in small)."""

    def __init__(self):
        super().__init__()
        self.emb, self.seg, self.fc = nn.Embedding(11, 4), nn.Embedding(2, 4), nn.Linear(4, 3)

    def forward(self, ids, seg):
        return self.fc(torch.tanh(self.emb(ids) + self.seg(seg)).mean(1))


def test_layer_ig_on_embeddings_from_token_ids_matches_captum():
    ca = pytest.importorskip("captum.attr")
    torch.manual_seed(1)
    m = Tok().double().eval()
    f, p = ax.functionalize(m)
    ids, seg = torch.randint(1, 11, (2, 6)), torch.randint(0, 2, (2, 6))
    pad = torch.zeros_like(ids)
    lig = ca.LayerIntegratedGradients(m, m.emb)
    theirs = lig.attribute((ids, seg), baselines=(pad, seg), target=1, n_steps=16, method="gausslegendre")
    ours = ax.layer.integrated_gradients(f, p, (ids, seg), 1, "emb", baseline=(pad, seg), n_steps=16)
    torch.testing.assert_close(ours, theirs, rtol=1e-6, atol=1e-9)
    same = ax.layer.integrated_gradients(f, p, (ids, seg), 1, "emb", baseline=lambda x: (torch.zeros_like(x[0]), x[1]),
                                         n_steps=16)
    torch.testing.assert_close(same, ours)
    # a list of layers: both embeddings interpolated together, one forward at x and one at the baseline
    both, delta = ax.layer.integrated_gradients(f, p, (ids, seg), 1, ["emb", "seg"], baseline=0, n_steps=16,
                                                return_convergence_delta=True)
    with pytest.warns(UserWarning, match="Multiple layers provided"):
        lig = ca.LayerIntegratedGradients(m, [m.emb, m.seg])
    theirs, their_delta = lig.attribute((ids, seg), baselines=(pad, pad), target=1, n_steps=16, method="gausslegendre",
                                        return_convergence_delta=True)
    assert isinstance(both, list) and len(both) == 2
    for o, t in zip(both, theirs):
        torch.testing.assert_close(o, t, rtol=1e-6, atol=1e-9)
    torch.testing.assert_close(delta, their_delta, rtol=0, atol=1e-8)
    assert delta.abs().max() < 1e-10  # every path passes through one of the two embeddings
    # methods that need no path through x take ids as well
    assert ax.layer.gradient_x_activation(f, p, (ids, seg), 1, "emb").shape == (2, 6, 4)


def test_layer_errors_for_ids_lists_and_inputs():
    torch.manual_seed(1)
    f, p = ax.functionalize(Tok().double().eval())
    ids, seg = torch.randint(1, 11, (2, 6)), torch.randint(0, 2, (2, 6))
    with pytest.raises(TypeError, match=r"baseline\[0\] must be ids like x \(dtype torch.int64\)"):
        ax.layer.integrated_gradients(f, p, (ids, seg), 1, "emb", baseline=(torch.zeros(2, 6), seg))
    with pytest.raises(TypeError, match="conductance interpolates x itself"):
        ax.layer.conductance(f, p, (ids, seg), 1, "emb")
    with pytest.raises(ValueError, match="not a floating point tensor"):
        ax.layer.integrated_gradients(f, p, (ids, seg), 1, "emb", attribute_to_layer_input=True)
    with pytest.raises(TypeError, match="layer must be"):
        ax.layer.gradient_x_activation(f, p, (ids, seg), 1, ["emb", "seg"])
    m = seq()
    f, p = ax.functionalize(m)
    with pytest.raises(ValueError, match=r"layer 'conv1' reaches the output only through the other listed layers \['conv2'\]"):
        ax.layer.integrated_gradients(f, p, X, T, ["conv1", "conv2"])
    with pytest.raises(TypeError, match="attribute_to_layer_input must be True or False"):
        ax.layer.activation(f, p, X, "conv2", attribute_to_layer_input=1)


def test_layer_callable_baseline_delta_and_progress(capsys):
    m = seq()
    f, p = ax.functionalize(m)
    ref = ax.layer.integrated_gradients(f, p, X, T, "conv2", baseline=X * 0.5, n_steps=8)
    got, delta = ax.layer.integrated_gradients(f, p, X, T, "conv2", baseline=lambda x: x * 0.5, n_steps=8,
                                               return_convergence_delta=True, progress=True, chunk_size=3)
    torch.testing.assert_close(got, ref)
    torch.testing.assert_close(delta, ref.flatten(1).sum(1) - (f(p, X) - f(p, X * 0.5)).gather(1, T[:, None])[:, 0])
    assert "Layer Integrated Gradients" in capsys.readouterr().err
    cond, delta = ax.layer.conductance(f, p, X, T, "conv2", baseline=lambda x: x * 0.5, n_steps=8,
                                       return_convergence_delta=True)
    torch.testing.assert_close(delta, cond.flatten(1).sum(1) - (f(p, X) - f(p, X * 0.5)).gather(1, T[:, None])[:, 0])


def test_a_list_of_layers_with_attribute_to_layer_input_is_refused():
    # found in review: two listed layers sharing their input got all zeros for one of them
    class Two(nn.Module):
        def __init__(self):
            super().__init__()
            self.a, self.b, self.o = nn.Linear(4, 3), nn.Linear(4, 3), nn.Linear(6, 2)

        def forward(self, x):
            return self.o(torch.cat([torch.tanh(self.a(x)), torch.relu(self.b(x))], 1))

    f, p = ax.functionalize(Two().double().eval())
    x = torch.randn(2, 4, dtype=torch.float64)
    with pytest.raises(ValueError, match="one layer at a time"):
        ax.layer.integrated_gradients(f, p, x, 1, ["a", "b"], attribute_to_layer_input=True)
    one = ax.layer.integrated_gradients(f, p, x, 1, "a", attribute_to_layer_input=True)
    assert one.abs().sum() > 0


def test_layer_of_a_plain_function_names_its_graph_nodes():
    """It said "module paths include []" for a functionalized plain function."""
    w = torch.randn(4, 3, dtype=torch.float64)

    def fn(p, x):
        return torch.tanh(x @ w).relu()

    f, _ = ax.functionalize(fn)
    x = torch.randn(2, 4, dtype=torch.float64)
    with pytest.raises(ValueError, match=r"no module calls.*name a node of the graph instead, e.g. \['matmul', 'tanh'"):
        ax.layer.activation(f, {}, x, layer="l1")
    assert ax.layer.activation(f, {}, x, layer="tanh").shape == (2, 3)


def test_conductance_on_a_model_left_in_training_mode_runs_with_the_warning():
    # the steps are vmapped: dropout in training mode failed with vmap's "random operation" error
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(4, 6), nn.ReLU(), nn.Dropout(0.2), nn.Linear(6, 2))  # .eval() forgotten
    f, p = ax.functionalize(net)
    with pytest.warns(UserWarning, match="training mode"):
        attr = ax.layer.conductance(f, p, torch.randn(3, 4), 0, "1", n_steps=4)
    assert attr.shape == (3, 6) and torch.isfinite(attr).all()
