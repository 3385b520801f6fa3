"""The Fashion-MNIST workflow of PyTorch's "Learn the Basics" tutorial, fast: the data
(``data``, ``loader``, ``whitening``), the training run (``config``, ``train``, ``loops``,
``distributed``, ``checkpoint``, ``rundir``, ``plots``) and the ``fastmlp`` command
(``cli``).

Every module here imports where the compiled extension cannot load: the library's compiled
parts (``fastmlp.nn``, ``fastmlp.optim``, ...) are imported inside the functions that build
or run a model (``tests/test_layering.py`` checks it).
"""
