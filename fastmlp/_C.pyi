# The compiled extension (csrc/, built by setup.py). Importing it registers the
# torch.ops.fastmlp.* ops with PyTorch; the module itself defines no Python names.
