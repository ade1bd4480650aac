"""The plan to other nodes (multi-node): node 0 decides, the others run what it publishes."""
import datetime
import json

from utils import InputError

from .runner import Runner, StepFailed


class PlanChannel:
    TIMEOUT = datetime.timedelta(days=7)

    def __init__(self, cfg):
        from torch.distributed import TCPStore
        a = cfg.args
        self.port = a.master_port + 1
        self.store = TCPStore(a.master_addr, self.port, is_master=cfg.is_leader, timeout=self.TIMEOUT,
                              wait_for_workers=False)
        self.count = 0
        self.nnodes = a.nnodes

    def publish(self, message):
        self.store.set(f'step/{self.count}', json.dumps(message))
        self.count += 1

    def close(self, ok):
        self.publish({'end': True, 'ok': ok})
        try:  # keep the store up until every node has read the end
            self.store.wait([f'ack/{n}' for n in range(1, self.nnodes)], datetime.timedelta(minutes=2))
        except Exception:
            pass

    def receive(self):
        message = json.loads(self.store.get(f'step/{self.count}'))
        self.count += 1
        return message

    def ack(self, node_rank):
        self.store.set(f'ack/{node_rank}', '1')


def follow(cfg, plan, say):
    """Nodes other than 0: run each distributed step node 0 publishes, with this node's torchrun flags."""
    channel = PlanChannel(cfg)
    runner = Runner(cfg, plan, say)
    steps = {s.name: s for s in plan.steps}
    say(f'node {cfg.args.node_rank}: following node 0 at {cfg.args.master_addr}:{channel.port}')
    while True:
        message = channel.receive()
        if message.get('end'):
            channel.ack(cfg.args.node_rank)
            if not message.get('ok'):
                raise InputError('node 0 stopped the pipeline; see its output')
            say('node 0 finished the pipeline')
            return
        step = steps.get(message['step'])
        if step is None:
            raise InputError(f"node 0 published step {message['step']}, which this node's command does not have: "
                             f'run the same command on every node')
        say(f'running {step.name}')
        try:
            runner.run(step, message['args'])
        except StepFailed as e:
            raise InputError(f'step {e}') from None
