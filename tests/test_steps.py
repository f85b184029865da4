"""The capturable training step (preresnet/steps.py) against the plain step.

On the CPU the step that a GPU captures in a CUDA graph -- static input and label buffers, the
learning rate in a 0-dim tensor the fused SGD reads, the autocast cache off -- runs directly. It must
train to the same weights, running statistics, momentum buffers and losses as the plain step, bit
for bit, over steps that cross a learning-rate change, for each network type, unfused and fused
(the fused kernels under the Triton interpreter, so the networks and images are tiny).
"""

import copy

import pytest
import torch

from preresnet import build_model, distributed
from preresnet.recipes import resolve_recipe
from preresnet.evaluation import evaluate
from preresnet.runtime import Runtime
from preresnet.steps import GraphedEval, GraphStep, PlainStep, build_step, make_optimizer

LRS = (0.1, 0.02, 0.02, 0.004)  # the warm-up/decay pattern: two changes, no recapture
NETWORKS = {"normal": ("normal", 1, 1, "paper"), "bottleneck": ("bottleneck", 1, 1, "paper"),
            "wide": ("wide", 1, 2, "wrn")}  # wrn: Nesterov momentum, weight decay 5e-4


def runtime(graphs: bool, fused: bool = False, amp: str = "off", **fields) -> Runtime:
    return Runtime(device=torch.device("cpu"), amp=amp, channels_last=False, compile=False, loader="torch",
                   fused=fused, cuda_graphs=graphs, **fields)


def batches(count: int, size: int, classes: int = 4, batch: int = 4):
    generator = torch.Generator().manual_seed(1)
    return [(torch.randn(batch, 3, size, size, generator=generator),
             torch.randint(0, classes, (batch,), generator=generator)) for _ in range(count)]


def train(model, rt: Runtime, recipe, data):
    model = copy.deepcopy(model)
    optimizer = make_optimizer(model, recipe, rt.device)
    scaler = torch.amp.GradScaler("cpu", enabled=rt.amp == "fp16")
    step, _ = build_step(model, optimizer, scaler, rt)
    losses = []
    model.train()
    for lr, (x, y) in zip(LRS, data):
        step.set_lr(lr)
        loss, logits = step(x, y)
        losses.append((loss.item(), logits.detach().clone()))
    return model, optimizer, step, losses


def assert_identical(a, b):
    (model_a, opt_a, _, losses_a), (model_b, opt_b, _, losses_b) = a, b
    for (loss_a, logits_a), (loss_b, logits_b) in zip(losses_a, losses_b, strict=True):
        assert loss_a == loss_b
        assert torch.equal(logits_a, logits_b)
    state_b = model_b.state_dict()
    for key, tensor in model_a.state_dict().items():  # weights, running statistics, num_batches_tracked
        assert torch.equal(tensor, state_b[key]), key
    for (pa, sa), (pb, sb) in zip(opt_a.state.items(), opt_b.state.items(), strict=True):
        assert torch.equal(sa["momentum_buffer"], sb["momentum_buffer"])


@pytest.mark.parametrize("fused", [False, True], ids=["unfused", "fused"])
@pytest.mark.parametrize("network", list(NETWORKS))
def test_the_body_a_gpu_would_capture_matches_the_plain_step_bit_for_bit(network, fused):
    """On the CPU GraphStep captures nothing: it runs, uncaptured, the body a GPU would capture --
    the batch copied into static buffers, the lr a device tensor the fused SGD reads, autocast
    without its weight cache -- which must train exactly as the plain step. That the captured graph
    replays the same is test_cuda_graph_replays_the_step's, on a GPU."""
    kind, depth, width, recipe_name = NETWORKS[network]
    torch.manual_seed(0)
    model = build_model(kind, depth, width, num_classes=4, fused=fused)
    recipe = resolve_recipe(recipe_name)
    data = batches(len(LRS), 8)
    plain = train(model, runtime(False, fused), recipe, data)
    graphed = train(model, runtime(True, fused), recipe, data)
    assert isinstance(plain[2], PlainStep) and not isinstance(plain[2], GraphStep)
    assert isinstance(graphed[2], GraphStep)
    assert_identical(plain, graphed)
    # the lr reached the optimizer as one device tensor, written in place: nothing to recapture
    step, optimizer = graphed[2], graphed[1]
    assert all(group["lr"] is step.lr for group in optimizer.param_groups)
    assert step.lr.dim() == 0 and step.lr.item() == pytest.approx(LRS[-1])
    # the weights moved, and differently from a run at a constant lr (the lr changes took effect)
    assert not torch.equal(next(model.parameters()), next(graphed[0].parameters()))


def test_lr_changes_take_effect_in_the_capturable_step():
    torch.manual_seed(0)
    model = build_model("normal", 1, num_classes=4)
    recipe = resolve_recipe("paper")
    data = batches(len(LRS), 8)
    changed = train(model, runtime(True), recipe, data)
    constant = train_with(model, runtime(True), recipe, data, [0.1] * len(LRS))
    changed_losses = [loss for loss, _ in changed[3]]
    assert changed_losses[:2] == constant[1][:2]  # the same until a step has run at the new lr
    assert changed_losses[2] != constant[1][2]
    assert not torch.equal(changed[0].conv1.weight, constant[0].conv1.weight)


def train_with(model, rt, recipe, data, lrs):
    model = copy.deepcopy(model)
    optimizer = make_optimizer(model, recipe, rt.device)
    step, _ = build_step(model, optimizer, torch.amp.GradScaler("cpu", enabled=False), rt)
    losses = []
    for lr, (x, y) in zip(lrs, data):
        step.set_lr(lr)
        losses.append(step(x, y)[0].item())
    return model, losses


def test_bf16_autocast_without_cache_changes_nothing():
    """The captured step turns autocast's weight-cast cache off (a graph must not keep it): the
    casts are recomputed, not changed."""
    torch.manual_seed(0)
    model = build_model("normal", 1, num_classes=4)
    recipe = resolve_recipe("paper")
    data = batches(3, 8)
    assert_identical(train(model, runtime(False, amp="bf16"), recipe, data[:3]),
                     train(model, runtime(True, amp="bf16"), recipe, data[:3]))


def test_tensor_lr_and_float_lr_give_the_same_update():
    """What a resumed run does when it switches --cuda-graphs: the fused SGD reads either form alike."""
    torch.manual_seed(0)
    results = []
    for as_tensor in (False, True):
        torch.manual_seed(0)
        model = torch.nn.Linear(6, 3)
        optimizer = make_optimizer(model, resolve_recipe("wrn"), torch.device("cpu"))
        lr = torch.tensor(0.1) if as_tensor else 0.1
        for group in optimizer.param_groups:
            group["lr"] = lr
        for i in range(3):
            if as_tensor:
                lr.fill_(0.1 / (i + 1))
            else:
                for group in optimizer.param_groups:
                    group["lr"] = 0.1 / (i + 1)
            optimizer.zero_grad()
            model(torch.ones(2, 6) * i).square().sum().backward()
            optimizer.step()
        results.append([p.detach().clone() for p in model.parameters()])
    assert all(torch.equal(a, b) for a, b in zip(*results))


def test_fallbacks_say_why():
    model = build_model("normal", 1, num_classes=4)
    optimizer = make_optimizer(model, resolve_recipe("paper"), torch.device("cpu"))
    fp16 = build_step(model, optimizer, torch.amp.GradScaler("cpu"), runtime(True, amp="fp16"))[0]
    assert type(fp16) is PlainStep and "GradScaler" in fp16.describe()
    ddp = build_step(model, optimizer, torch.amp.GradScaler("cpu", enabled=False),
                       runtime(True, dist=distributed.Dist(rank=0, world_size=2)))[0]
    assert type(ddp) is PlainStep and "DDP" in ddp.describe()
    graphed = build_step(model, optimizer, torch.amp.GradScaler("cpu", enabled=False), runtime(True))[0]
    assert "without capture" in graphed.describe()


def test_graphed_evaluation_matches_plain_evaluation_and_reports_timings():
    from preresnet.loaders import build_loader
    import numpy as np

    torch.manual_seed(0)
    model = build_model("normal", 1, num_classes=4)
    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, size=(23, 32, 32, 3), dtype=np.uint8)  # 23: a last partial batch
    labels = rng.integers(0, 4, size=23).astype(np.int64)
    loader = build_loader(images, labels, batch_size=10, train=False, backend="torch", device="cpu")
    rt = runtime(True)
    optimizer = make_optimizer(model, resolve_recipe("paper"), rt.device)
    step, eval_forward = build_step(model, optimizer, torch.amp.GradScaler("cpu", enabled=False), rt)
    assert isinstance(eval_forward, GraphedEval)
    graphed = evaluate(eval_forward, loader, rt, 4)
    plain = evaluate(model, loader, runtime(False), 4)
    assert graphed == plain
    x, y = batches(1, 32)[0]
    step.set_lr(0.1)
    step(x, y)
    timings = step.take_timings()
    assert timings["compile_seconds"] > 0 and "capture_seconds" not in timings  # nothing captured on a CPU
    assert step.take_timings() == {}  # reported once


@pytest.mark.gpu
@pytest.mark.parametrize("fused", [False, True], ids=["unfused", "fused"])
def test_cuda_graph_replays_the_step(fused):
    """On a GPU: the captured step (warm-up, capture, replays across lr changes) against the plain
    step, bf16. cuDNN may pick other kernels in the side-stream warm-up than in plain eager steps, so
    the tolerance is bf16 rounding rather than bit identity."""
    from preresnet.kernels import INTERPRETED

    if fused and INTERPRETED:  # a GPU run of the test suite with the tests' default interpreter
        pytest.skip("TRITON_INTERPRET=1: the fused step needs the compiled kernels; run with TRITON_INTERPRET=0")
    torch.manual_seed(0)
    model = build_model("normal", 1, num_classes=4, fused=fused).cuda().to(memory_format=torch.channels_last)
    recipe = resolve_recipe("paper")
    data = [(x.cuda().contiguous(memory_format=torch.channels_last), y.cuda()) for x, y in batches(8, 32, batch=16)]
    results = []
    for graphs in (False, True):
        rt = Runtime(device=torch.device("cuda"), amp="bf16", channels_last=True, compile=False, loader="torch",
                     fused=fused, cuda_graphs=graphs)
        m = copy.deepcopy(model)
        optimizer = make_optimizer(m, recipe, rt.device)
        step, _ = build_step(m, optimizer, torch.amp.GradScaler("cuda", enabled=False), rt)
        losses = []
        for i, (x, y) in enumerate(data):
            step.set_lr(0.1 if i < 5 else 0.01)
            losses.append(step(x, y)[0].item())
        results.append((m, losses, step))
    (plain, plain_losses, _), (graphed, graph_losses, step) = results
    assert step.capture is not None and step.capture.graph is not None
    assert graph_losses == pytest.approx(plain_losses, rel=2e-2)
    for (key, a), b in zip(plain.state_dict().items(), graphed.state_dict().values()):
        if a.is_floating_point():
            torch.testing.assert_close(b, a, rtol=5e-2, atol=5e-3, msg=key)
        else:
            assert torch.equal(a, b), key  # num_batches_tracked counted inside the graph


@pytest.mark.gpu
@pytest.mark.parametrize("fused", [False, True], ids=["unfused", "fused"])
def test_packed_captured_steps_on_their_streams_match_each_run_alone(fused):
    """On a GPU: 3 runs packed as train.py --seeds runs them -- each its own captured step replayed
    on its own stream, queued in turn so that they overlap -- against each run trained alone. Each
    run's step owns the fused kernels' ticket counters (preresnet.kernels.workspace): shared ones,
    corrupted by two runs' kernels at once, would show here as wrong batch statistics. The runs are the same kernels on the
    same inputs, so only the order of independent work differs: the tolerance is tight."""
    from preresnet.kernels import INTERPRETED

    if fused and INTERPRETED:
        pytest.skip("TRITON_INTERPRET=1: the fused step needs the compiled kernels; run with TRITON_INTERPRET=0")
    rt = Runtime(device=torch.device("cuda"), amp="off", channels_last=True, compile=False, loader="torch",
                 fused=fused, cuda_graphs=True)
    recipe = resolve_recipe("paper")

    def runs():
        made = []
        for seed in range(3):
            torch.manual_seed(seed)
            model = build_model("normal", 1, num_classes=4, fused=fused).cuda().to(memory_format=torch.channels_last)
            step, _ = build_step(model, make_optimizer(model, recipe, rt.device),
                                   torch.amp.GradScaler("cuda", enabled=False), rt)
            data = [(x.cuda().contiguous(memory_format=torch.channels_last), y.cuda())
                    for x, y in batches(8, 32, batch=16 + seed)]
            made.append((model, step, data))
        return made

    alone = runs()
    for model, step, data in alone:
        for i, (x, y) in enumerate(data):
            step.set_lr(0.1 if i < 5 else 0.01)
            step(x, y)
    packed = runs()
    streams = [torch.cuda.Stream() for _ in packed]
    torch.cuda.synchronize()
    for i in range(8):
        for (model, step, data), stream in zip(packed, streams):
            with torch.cuda.stream(stream):
                step.set_lr(0.1 if i < 5 else 0.01)
                step(*data[i])
    torch.cuda.synchronize()
    for (model, step, _), (reference, _, _) in zip(packed, alone):
        assert step.capture is not None and step.capture.graph is not None
        for (key, a), b in zip(reference.state_dict().items(), model.state_dict().values()):
            torch.testing.assert_close(b, a, rtol=1e-5, atol=1e-6, msg=key)
