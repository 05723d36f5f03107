"""Run train_gpt2.py in this process, then print what its memory really took on the device.

    python gpu/trainer_memory.py [train_gpt2.py flags]      # what gpu/benchmark.py runs for --preset full24gb

The trainer's summary reports torch.cuda.max_memory_allocated: the tensors. A card is filled by more: the
caching allocator's reserve (max_memory_reserved) and the CUDA context, which lives outside the allocator.
The last line is

    trainer_memory: context_mib:C max_reserved_mib:R max_allocated_mib:A device_total_mib:T

C is the device's used memory minus the allocator's reserve, measured at the first CUDA use (the context,
and any other process on the card); on a CPU C and T are 0 and R, A are the peak resident set. A card of
T' MiB holds the run if C + R < T'. The exit status is the trainer's.
"""

import os
import resource
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

LINE = "trainer_memory: context_mib:{} max_reserved_mib:{} max_allocated_mib:{} device_total_mib:{}"


def context_mib(torch, device):
    free, total = torch.cuda.mem_get_info(device)  # creates the context if nothing has yet
    return (total - free - torch.cuda.memory_reserved(device)) // 2**20, total // 2**20


def main(argv):
    import torch

    import train_gpt2

    context = total = 0
    cuda = torch.cuda.is_available() and "--device=cpu" not in argv
    if cuda:
        context, total = context_mib(torch, torch.device("cuda", 0))
    try:
        return train_gpt2.main(argv)
    finally:
        if cuda:
            reserved = torch.cuda.max_memory_reserved(0) // 2**20
            allocated = torch.cuda.max_memory_allocated(0) // 2**20
        else:
            reserved = allocated = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss // 1024
        print(LINE.format(context, reserved, allocated, total), flush=True)


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
