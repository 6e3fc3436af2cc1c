"""FrozenLayers keeps the detached output of EVERY frozen decoder layer, although replay only needs the last one
(each replayed layer ignores its input and returns its own recording)."""
import common, torch, sys
from common import Peak
from peft_unlearn.capture import FrozenLayers

model = common.llama(hidden=1024, inter=2048, layers=9, vocab=1000, heads=16)
ids = torch.randint(5, 400, (64, 128)); mask = torch.ones_like(ids)
inputs = {"input_ids": ids, "attention_mask": mask}
one = 64 * 128 * 1024 * 4 / 2**20
print(f"llama hidden 1024, 9 layers; batch 64 x 128 tokens; one layer output = {one:.0f} MB fp32")
print("n_frozen | held tensor MB | peak extra MB")
for n in (1, 2, 4, 8):
    with Peak() as p:
        f = FrozenLayers(model, n, inputs)
        held = sum(o.numel() * o.element_size() for o in (x[0] if isinstance(x, tuple) else x for x in f.outputs)) / 2**20
    print(f"{n} | {held:.0f} | {p.extra:.0f}")
    del f
