"""What the study is: the paper's protocol and reported tables, Table 1's structures, CIFAR-10
and its conversion to betons, and the model (the eager ResNet, the reference every fast path is
tested against).

Imports nothing else of fastres: everything above (kernels, loaders, a run, the grid, the report)
reads its constants and its model from here. protocol, structures and paper import no torch.
"""
