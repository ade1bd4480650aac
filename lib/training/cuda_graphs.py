"""`--cuda_graphs`: a whole training update (forward, backward, optimizer step) captured once as a CUDA graph
and replayed at every iteration, so the host launches one graph instead of ~10,000 kernels.

- `CapturedStep(fn)`: fn(*inputs) runs eagerly for the first WARMUP calls (on a side stream: real
  iterations, they train as the eager path does), is captured at the next call and replayed from then on,
  each call's inputs copied into the graph's own tensors.
- `GraphedUpdate(step, optimizer)`: the engine's update (`step.EagerUpdate`) as a CapturedStep.
  Stage 3 adds its bank step as a second CapturedStep (`graph_stage3`).

What makes the update capturable, checked on a CPU by tests/test_step_graphs.py: fixed shapes (drop_last;
weak samples by mask, not by selection), no host synchronisation and no host tensor inside the update
(the bank lookup runs in `step.inputs`, before it), AdamW's capturable path with the learning rate a
device tensor that the schedule fills between replays (lib/training/optim.py), autocast without its
weight cache. Dropout and drop-path draw from the CUDA generator, which graphs replay with fresh offsets.
One process only for now: capturing DDP's all-reduce (and the bank's gather) is not done.
"""
import torch

from utils import InputError

from .step import autocast

WARMUP = 3  # eager iterations before the capture: optimizer state, cuBLAS workspaces, compiled kernels


def check_cuda_graphs(args, world_size):
    """One line unless --cuda_graphs can run: --device cuda, one process."""
    if not getattr(args, 'cuda_graphs', False):
        return
    if not str(args.device).startswith('cuda'):
        raise InputError(f'--cuda_graphs: needs a CUDA device (--device cuda); this run uses --device {args.device}')
    if world_size > 1:
        raise InputError(f'--cuda_graphs: one process only for now ({world_size} processes): capturing '
                         f'DDP\'s gradient all-reduce is not supported; run without it under torchrun')


class CapturedStep:
    """fn(*inputs) -> outputs, replayed as one CUDA graph after `warmup` eager calls.

    after_eager() runs after each eager call (e.g. freeing gradients, so that the capture allocates them
    in the graph's memory). Replayed outputs are the graph's own tensors: read them before the next call.
    """

    def __init__(self, fn, device, *, warmup=WARMUP, after_eager=None):
        if device.type != 'cuda':
            raise InputError(f'--cuda_graphs: needs a CUDA device, not {device}')
        self.fn, self.device, self.warmup, self.after_eager = fn, device, warmup, after_eager
        self.stream = torch.cuda.Stream(device)
        self.graph, self.static_inputs, self.static_outputs = None, None, None
        self.eager_calls = 0

    def __call__(self, *inputs):
        if self.graph is None and self.eager_calls < self.warmup:
            self.eager_calls += 1
            return self._side_stream(lambda: self._eager(inputs))
        if self.graph is None:
            self._capture(inputs)
        else:
            for static, x in zip(self.static_inputs, inputs):
                static.copy_(x, non_blocking=True)
        self.graph.replay()
        return self.static_outputs

    def _eager(self, inputs):
        out = self.fn(*inputs)
        if self.after_eager is not None:
            self.after_eager()
        return out

    def _side_stream(self, run):
        current = torch.cuda.current_stream(self.device)
        self.stream.wait_stream(current)
        with torch.cuda.stream(self.stream):
            out = run()
        current.wait_stream(self.stream)
        return out

    def _capture(self, inputs):
        if any(x.device != self.device for x in inputs):
            raise RuntimeError(f'CUDA graph inputs must be on {self.device}: '
                               f'{[str(x.device) for x in inputs]}')
        self.static_inputs = [x.clone() for x in inputs]
        torch.cuda.synchronize(self.device)
        self.graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(self.graph, stream=self.stream):
            self.static_outputs = self.fn(*self.static_inputs)


class GraphedUpdate:
    """update(i, batch) -> loss as `step.EagerUpdate` (without its after_backward hook: one process), as a
    replayed CUDA graph: forward under autocast, backward, optimizer step."""

    def __init__(self, step, optimizer, *, device, amp=False, warmup=WARMUP):
        self.step, self.optimizer, self.device, self.amp = step, optimizer, device, amp
        self.captured = CapturedStep(self._update, device, warmup=warmup,
                                     after_eager=lambda: optimizer.zero_grad(set_to_none=True))

    def _update(self, *inputs):
        with autocast(self.device, self.amp, cache=False):  # the cast weights must not outlive a capture
            loss = self.step.loss(*inputs)
        loss.backward()
        self.optimizer.step()
        return loss.detach()

    def __call__(self, i, batch):
        return self.captured(*self.step.inputs(batch)).clone()  # the graph's loss is rewritten by the next replay


def graph_stage3(joint, warmup=WARMUP):
    """Stage 3's bank step (teacher forward, gradient to the bank, the bank's AdamW step) as a CapturedStep
    that `Stage3Joint.before_step` replays at each planned inner step."""
    def bank_step(*inputs):
        joint.bank.embedding.grad = torch.autograd.grad(joint.bank_loss(*inputs), joint.bank.embedding)[0]
        joint.bank_optimizer.step()
    joint.autocast_cache = False
    device = joint.bank.embedding.device
    joint.graphed_bank_update = CapturedStep(
        bank_step, device, warmup=warmup, after_eager=lambda: joint.bank_optimizer.zero_grad(set_to_none=True))
    return joint


def build_update(step, optimizer, args, device):
    """The engine's update for this run: a GraphedUpdate under --cuda_graphs, else None (the engine's eager
    one). `check_cuda_graphs` (in the flag checks) has made sure there is one process on a CUDA device: the stages'
    after-backward hook, the bank's gradient sync, is a no-op there."""
    if not getattr(args, 'cuda_graphs', False):
        return None
    return GraphedUpdate(step, optimizer, device=device, amp=args.amp)
