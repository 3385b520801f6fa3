# The compiled extension (csrc/, built by setup.py). Importing it registers the
# torch.ops.fastmlp.* ops with PyTorch. Its one Python name:

# The whole-MLP ops' activation names, in the order of C++'s enum (the list
# FASTMLP_ACTIVATIONS in csrc/activation_kinds.h).
def _activation_names() -> list[str]: ...
