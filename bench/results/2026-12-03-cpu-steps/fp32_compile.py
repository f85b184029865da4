"""fp32 channels-last PreResNet-20 training step at batch 128, eager against torch.compile (the
provider vocabulary of bench.workloads has no fp32 compiled row; this is the same step)."""
import statistics, time, torch, torch.nn.functional as F
from preresnet import get_model
torch.manual_seed(0)
x = torch.randn(128, 3, 32, 32).contiguous(memory_format=torch.channels_last); y = torch.randint(0, 10, (128,))
for compiled in (False, True):
    model = get_model("preresnet20").to(memory_format=torch.channels_last).train()
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9, fused=True)
    forward = torch.compile(model) if compiled else model
    def step():
        loss = F.cross_entropy(forward(x), y); opt.zero_grad(set_to_none=True); loss.backward(); opt.step()
    t = time.perf_counter(); step(); first = time.perf_counter() - t
    for _ in range(2): step()
    times = []
    for _ in range(7):
        t = time.perf_counter(); step(); times.append(time.perf_counter() - t)
    print(f"fp32 channels-last {'compiled' if compiled else 'eager'}: median {1000 * statistics.median(times):.1f} ms "
          f"({128 / statistics.median(times):.0f} images/s), first step {first:.1f} s")
print("torch", torch.__version__, "threads", torch.get_num_threads())
