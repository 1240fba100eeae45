import json

import pytest

from fastres.study.structures import (
    STRUCTURES,
    ResNetSpec,
    SpecError,
    describe,
    feature_map_sizes,
    main,
    param_count,
)

# Table 1 of the paper (parameter counts) and protocol.md (forward GFLOP per image).
TABLE1 = {1: (4_977_226, 0.658), 2: (4_980_298, 0.664), 3: (4_984_906, 0.674),
          4: (4_991_050, 0.686), 5: (4_998_730, 0.702), 6: (4_967_754, 3.164),
          7: (4_896_394, 1.551), 8: (4_837_962, 3.106), 9: (4_972_682, 6.347)}
TINY = "N=2 B=1,1 C_in=16 F0=3 P0=1 F1=3 P1=1 K=1"


@pytest.mark.parametrize("i", sorted(TABLE1))
def test_table1_counts_and_flops(i):
    params, gflop = TABLE1[i]
    assert param_count(STRUCTURES[i]) == params
    d = describe(STRUCTURES[i])
    assert d["params"] == params
    assert d["gflop_per_image"] == pytest.approx(gflop, abs=5e-4)
    STRUCTURES[i].validate()


def test_structures_cover_table1_exactly():
    assert sorted(STRUCTURES) == list(range(1, 10))


def test_parse_round_trip():
    spec = ResNetSpec.parse(TINY)
    assert spec == ResNetSpec(N=2, B=(1, 1), C_in=16, F0=3, P0=1, F1=3, P1=1, K=1)
    assert ResNetSpec.parse(str(spec)) == spec
    assert ResNetSpec.parse("N=2 B=1,1 C_in=16 F0=3 P0=1 F1=3 P1=1").K == 1


@pytest.mark.parametrize("text, field", [
    ("N=3 B=1,1 C_in=16 F0=3 P0=1 F1=3 P1=1 K=1", r"len\(B\)"),
    ("N=0 B= C_in=16 F0=3 P0=1 F1=3 P1=1 K=1", "is not FIELD=VALUE"),
    ("N=0 B=1 C_in=16 F0=3 P0=1 F1=3 P1=1 K=1", "N must be positive"),
    ("N=2 B=1,0 C_in=16 F0=3 P0=1 F1=3 P1=1 K=1", r"B\[1\] must be positive"),
    ("N=2 B=1,1 C_in=0 F0=3 P0=1 F1=3 P1=1 K=1", "C_in must be positive"),
    ("N=2 B=1,1 C_in=16 F0=-3 P0=1 F1=3 P1=1 K=1", "F0 must be positive"),
    ("N=2 B=1,1 C_in=16 F0=3 P0=-1 F1=3 P1=1 K=1", "P0 must be zero or positive"),
    ("N=2 B=1,1 C_in=16 F0=3 P0=1 F1=0 P1=1 K=1", "F1 must be positive"),
    ("N=2 B=1,1 C_in=16 F0=3 P0=1 F1=3 P1=-2 K=1", "P1 must be zero or positive"),
    ("N=2 B=1,1 C_in=16 F0=3 P0=1 F1=3 P1=1 K=0", "K must be positive"),
    ("N=2 B=1,1 C_in=16 F0=41 P0=4 F1=3 P1=1 K=1", "F0=41 with P0=4 shrinks"),
    ("N=4 B=1,1,1,1 C_in=16 F0=3 P0=1 F1=9 P1=0 K=1", "F1=9 with P1=0"),
    ("N=2 B=1,1 C_in=16 F0=3 P0=1 F1=3 P1=0 K=1", "identity shortcut"),
    ("N=2 B=1,1 C_in=16 F0=3 P0=1 F1=3 P1=1 K=3", "K=3 gives"),
    ("N=4 B=2,1,1,1 C_in=128 F0=3 P0=1 F1=3 P1=1 K=1", "over the budget of 5,000,000"),
    ("N=2 B=1,1 X=3 C_in=16 F0=3 P0=1 F1=3 P1=1", "unknown spec field 'X'"),
    ("N=2 B=1,a C_in=16 F0=3 P0=1 F1=3 P1=1", "B=.* is not an integer"),
    ("N=2 B=1,1 C_in=16 F0=3 P0=1 F1=3", "missing field.*P1"),
    ("N=2 N=2 B=1,1 C_in=16 F0=3 P0=1 F1=3 P1=1", "given twice"),
])
def test_spec_errors_name_the_field(text, field):
    with pytest.raises(SpecError, match=field):
        ResNetSpec.parse(text).validate()


def test_budget_can_be_raised():
    big = ResNetSpec.parse("N=4 B=2,1,1,1 C_in=128 F0=3 P0=1 F1=3 P1=1 K=1")
    assert big.validate(budget=30_000_000) is big


def test_feature_maps_of_structure_1():
    assert feature_map_sizes(STRUCTURES[1]) == [32, 32, 16, 8, 4]
    assert feature_map_sizes(STRUCTURES[8]) == [32, 32, 16]


def test_cli_json(capsys):
    assert main(["--format", "json"]) == 0
    rows = json.loads(capsys.readouterr().out)
    assert [r["structure"] for r in rows] == list(range(1, 10))
    assert {r["structure"]: r["params"] for r in rows} == {i: p for i, (p, _) in TABLE1.items()}


def test_cli_table_and_bad_spec(capsys):
    assert main([]) == 0
    out = capsys.readouterr().out
    assert "| 1 | 4 | 2 1 1 1 | 64 | 3 | 1 | 3 | 1 | 1 | 4,977,226 | 0.658 |" in out
    assert main(["--spec", "N=3 B=1,1 C_in=16 F0=3 P0=1 F1=3 P1=1"]) == 2
    assert "len(B)" in capsys.readouterr().err


def test_cli_takes_the_param_budget_it_advises(capsys):
    """Issue 8: the over-budget error advised --param-budget, which this command refused."""
    big = "N=4 B=2,1,1,1 C_in=128 F0=3 P0=1 F1=3 P1=1 K=1"
    assert main(["--spec", big, "--format", "json"]) == 2
    assert "--param-budget" in capsys.readouterr().err
    assert main(["--spec", big, "--format", "json", "--param-budget", "30000000"]) == 0
    assert json.loads(capsys.readouterr().out)[0]["params"] == 19_883_146
