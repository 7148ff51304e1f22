"""tfgen.torch_pickle: torch.save files read without torch, and pickles that would run code refused."""

import collections
import os
import pickle
import zipfile

import numpy as np
import pytest
import torch

from tfgen.torch_pickle import TorchCheckpoint, UnsafePickleError


def _state_dict():
    torch.manual_seed(0)
    weight = torch.randn(4, 6)
    return collections.OrderedDict(
        weight=weight,
        transposed=weight.t(),  # a strided view of the same storage
        corner=weight[1:, 2:],  # an offset view
        half=torch.randn(5).half(),
        bfloat=torch.randn(3, 2, dtype=torch.bfloat16),
        double=torch.randn(2, dtype=torch.float64),
        mask=torch.tril(torch.ones(3, 3, dtype=torch.uint8)).view(1, 1, 3, 3),  # old GPT-2 attn.bias
        scalar=torch.tensor(-1e4),  # old GPT-2 attn.masked_bias
        parameter=torch.nn.Parameter(torch.randn(2, 2)),
    )


@pytest.mark.parametrize("zip_layout", [True, False], ids=["zip", "legacy"])
def test_reads_what_torch_saves_in_both_layouts(tmp_path, zip_layout):
    expected = _state_dict()
    path = tmp_path / "pytorch_model.bin"
    torch.save(expected, path, _use_new_zipfile_serialization=zip_layout)
    loaded = TorchCheckpoint(path)
    assert list(loaded) == list(expected)
    for name, tensor in expected.items():
        array = loaded[name]
        assert array.shape == tuple(tensor.shape), name
        assert str(array.dtype) == str(tensor.dtype).removeprefix("torch."), name
        np.testing.assert_array_equal(array.astype(np.float64), tensor.detach().double().numpy(), err_msg=name)
        assert array.flags.c_contiguous


class _RunsCommand:
    def __init__(self, command):
        self.command = command

    def __reduce__(self):
        return os.system, (self.command,)


class _Evaluates:
    def __init__(self, code):
        self.code = code

    def __reduce__(self):
        return eval, (self.code,)


def malicious_checkpoints(directory, marker):
    """pytorch_model.bin files whose pickles would create `marker` if unpickled by pickle.load (or torch.load)."""
    payloads = {
        "os-system": {"weight": _RunsCommand(f"touch {marker}")},
        "eval": {"weight": _Evaluates(f"open({str(marker)!r}, 'w')")},
    }
    paths = []
    for name, payload in payloads.items():
        data = pickle.dumps(payload, protocol=2)
        zipped = directory / f"{name}-zip" / "pytorch_model.bin"
        zipped.parent.mkdir(parents=True)
        with zipfile.ZipFile(zipped, "w", zipfile.ZIP_STORED) as archive:  # torch.save's layout
            archive.writestr("archive/data.pkl", data)
            archive.writestr("archive/version", "3\n")
        legacy = directory / f"{name}-legacy" / "pytorch_model.bin"
        legacy.parent.mkdir(parents=True)
        legacy.write_bytes(data)  # the first pickle of a legacy file
        paths += [zipped, legacy]
    return paths


def test_a_pickle_that_would_run_code_is_refused_and_nothing_runs(tmp_path):
    marker = tmp_path / "ran"
    for path in malicious_checkpoints(tmp_path, marker):
        with pytest.raises(UnsafePickleError) as error:
            TorchCheckpoint(path)
        message = str(error.value)
        assert str(path) in message and "nothing from the file was run" in message
        assert (".system" in message) or ("builtin__.eval" in message), message  # the global is named
        assert not marker.exists()
    # The files are real attacks: unpickled as pickle.load does, the first one runs its command.
    with zipfile.ZipFile(tmp_path / "os-system-zip" / "pytorch_model.bin") as archive:
        pickle.loads(archive.read("archive/data.pkl"))
    assert marker.exists()


def test_other_files_are_clear_errors(tmp_path):
    not_a_state_dict = tmp_path / "list.bin"
    torch.save([torch.ones(2)], not_a_state_dict)
    with pytest.raises(ValueError, match="not a state dict"):
        TorchCheckpoint(not_a_state_dict)
    garbage = tmp_path / "garbage.bin"
    garbage.write_bytes(b"\x00not a pickle at all")
    with pytest.raises(pickle.UnpicklingError, match="garbage.bin"):
        TorchCheckpoint(garbage)
