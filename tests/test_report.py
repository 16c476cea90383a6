"""Tests of recon.report: the per-layer table, totals, JSON round trip."""

from __future__ import annotations

import dataclasses
import json
import math
import re

import pytest

from recon.report import LayerReport, Report, format_count


def make_report(
    output_error: float | None = 0.0042, blocks: dict[str, float] | None = None
) -> Report:
    layers = [
        LayerReport("features.0", "conv", 64, 32, "lasso", "lstsq", 0.1234, 0.0123, 1.234),
        LayerReport(
            "layer1.0.conv1.sampler",
            "sampler",
            256,
            128,
            "thinet",
            "scale",
            math.nan,
            math.nan,
            0.5,
            note="lstsq->scale (wide linear consumer)",
        ),
        LayerReport("classifier.0", "linear", 4096, 4096, "lasso", "none", 0.0, 0.0, 12.0),
    ]
    return Report(
        layers=layers,
        flops_before=313_524_224,
        flops_after=156_200_000,
        params_before=14_728_266,
        params_after=5_000_000,
        seconds=12.3,
        method="lasso",
        reconstruct="lstsq",
        output_error=output_error,
        blocks={} if blocks is None else blocks,
    )


BLOCKS = {"layer1.0": 0.0123, "layer1.1": math.nan, "layer10.0": 0.5, "layer2.0": 0.5}


@pytest.mark.parametrize(
    ("n", "unit", "expected"),
    [
        (0, "", "0"),
        (512, "", "512"),
        (512, "FLOPs", "512 FLOPs"),
        (1_500, "", "1.5K"),
        (14_728_266, "", "14.73M"),
        (313_524_224, "FLOPs", "313.5 MFLOPs"),
        (156_200_000, "FLOPs", "156.2 MFLOPs"),
        (999_999, "", "1M"),
        (2.5e9, "FLOPs", "2.5 GFLOPs"),
        (3e12, "", "3T"),
    ],
)
def test_format_count(n, unit, expected):
    assert format_count(n, unit) == expected


def test_speedup_and_params_ratio():
    report = make_report()
    assert report.speedup == pytest.approx(313_524_224 / 156_200_000)
    assert report.params_ratio == pytest.approx(14_728_266 / 5_000_000)
    report.flops_after = 0
    assert report.speedup == math.inf


def test_table_has_every_layer_and_aligned_rows():
    report = make_report()
    text = str(report)
    assert text == report.to_text()
    lines = text.splitlines()
    header = next(i for i, line in enumerate(lines) if line.startswith("layer"))
    table = lines[header : header + 2 + len(report.layers)]
    assert len({len(line) for line in table}) == 1  # header, rule and rows: same length
    for layer, row in zip(report.layers, table[2:], strict=True):
        assert row.startswith(layer.name)
        assert re.search(rf"\b{layer.channels_before} +→ +{layer.channels_after}\b", row)
    assert "50.0%" in table[2] and "100.0%" in table[4]
    assert "0.1234" in table[2] and "0.0123" in table[2]
    assert "lstsq->scale (wide linear consumer)" in table[3]
    # columns line up: the "→" of every row is at the same place
    assert len({row.index("→") for row in table[2:]}) == 1


def test_totals_block():
    text = str(make_report())
    assert "313.5 MFLOPs → 156.2 MFLOPs, 2.01× fewer" in text
    assert "14.73M → 5M, 2.95× fewer" in text
    assert "12.30 s" in text
    assert "output error" in text and "0.0042" in text
    assert "1 of 2 pruned, 1 sampler layer\n" in text  # the sampler row counts apart
    assert "output error" not in str(make_report(output_error=None))


def test_empty_report_renders():
    report = Report([], 100, 50, 10, 5, 0.0, "l1", "none")
    assert "100 FLOPs → 50 FLOPs, 2.00× fewer" in str(report)


def test_dict_round_trip_and_nan_is_none():
    report = make_report()
    d = report.to_dict()
    assert d["layers"][1]["error_before"] is None
    assert d["layers"][1]["error_after"] is None
    assert d["speedup"] == pytest.approx(report.speedup)
    back = Report.from_dict(d)
    assert back == report
    assert math.isnan(back.layers[1].error_before)
    assert back != make_report(output_error=0.5)


def test_json_round_trip_and_file(tmp_path):
    report = make_report()
    path = tmp_path / "report.json"
    text = report.to_json(path)
    assert "NaN" not in text
    assert '"error_before": null' in text
    assert json.loads(path.read_text(encoding="utf-8")) == json.loads(text)
    assert "→" not in text  # the JSON holds numbers, not the table
    assert Report.from_json(path.read_text(encoding="utf-8")) == report
    assert Report.from_dict(json.loads(text)) == report
    assert Report.from_json(make_report(output_error=None).to_json()).output_error is None


def test_layer_report_equality_and_kept_fraction():
    a = LayerReport("x", "conv", 8, 2, "l1", "lstsq", math.nan, 0.5, 1.0)
    b = LayerReport("x", "conv", 8, 2, "l1", "lstsq", math.nan, 0.5, 1.0)
    assert a == b
    assert a != LayerReport("x", "conv", 8, 3, "l1", "lstsq", math.nan, 0.5, 1.0)
    assert a.kept_fraction == 0.25
    assert LayerReport.from_dict(a.to_dict()) == a


def test_from_dict_bad_input():
    d = make_report().to_dict()
    del d["flops_after"]
    with pytest.raises(ValueError, match=r"'d' argument.*Missing \['flops_after'\]"):
        Report.from_dict(d)
    with pytest.raises(TypeError, match="'d' argument"):
        Report.from_dict([1, 2])
    layer = make_report().layers[0].to_dict()
    del layer["name"]
    with pytest.raises(ValueError, match=r"LayerReport.*\['name'\]"):
        LayerReport.from_dict(layer)


def test_sampler_row_renders_and_is_counted_apart():
    report = make_report()
    row = next(line for line in str(report).splitlines() if line.startswith("layer1.0.conv1"))
    assert re.match(r"layer1\.0\.conv1\.sampler +sampler +256 → +128 +50\.0%", row)
    sampler = report.layers[1]
    report.layers += [
        dataclasses.replace(sampler, name=f"layer{i}.0.conv1.sampler") for i in (2, 3)
    ]
    report.layers.append(dataclasses.replace(report.layers[0], name="features.3"))
    assert "layers        2 of 3 pruned, 3 sampler layers\n" in str(report)
    only_samplers = Report([sampler], 100, 50, 10, 5, 0.0, "l1", "none")
    assert "0 of 0 pruned, 1 sampler layer" in str(only_samplers)


def test_blocks_table_only_when_non_empty_and_aligned():
    assert "output error\n" not in str(make_report())
    assert "block" not in str(make_report(output_error=None))
    report = make_report(blocks=BLOCKS)
    lines = str(report).splitlines()
    header = lines.index(next(line for line in lines if line.startswith("block ")))
    table = lines[header : header + 2 + len(BLOCKS)]
    assert re.fullmatch(r"block +output error", table[0])
    assert len({len(line) for line in table}) == 1  # header, rule and rows: same length
    assert [row.split()[0] for row in table[2:]] == list(BLOCKS)  # insertion order
    assert table[2].endswith(" 0.0123") and table[3].endswith(" -")
    # after the layer table (and a blank line), before the totals (and a blank line)
    assert lines[header - 1] == "" and lines[header - 2].startswith("classifier.0")
    assert lines[header + len(table)] == "" and lines[header + len(table) + 1].startswith("FLOPs")


def test_worst_block():
    text = str(make_report(blocks=BLOCKS))
    assert "worst block   layer10.0 (0.5000)" in text  # NaN skipped, first of a tie
    assert "worst block" not in str(make_report())
    assert "worst block" not in str(make_report(blocks={"layer1.0": math.nan}))
    inf = str(make_report(blocks={"layer1.0": 0.1, "layer1.1": math.inf}))
    assert "worst block   layer1.1 (inf)" in inf


def test_blocks_json_round_trip_with_nan():
    report = make_report(blocks=BLOCKS)
    text = report.to_json()
    assert "NaN" not in text
    assert json.loads(text)["blocks"] == {
        "layer1.0": 0.0123,
        "layer1.1": None,
        "layer10.0": 0.5,
        "layer2.0": 0.5,
    }
    back = Report.from_json(text)
    assert back == report
    assert list(back.blocks) == list(BLOCKS)
    assert math.isnan(back.blocks["layer1.1"])
    assert str(back) == str(report)


def test_from_dict_without_blocks():
    d = make_report().to_dict()
    del d["blocks"]  # a report saved before blocks existed
    back = Report.from_dict(d)
    assert back.blocks == {}
    assert back == make_report()
    assert Report([], 1, 1, 1, 1, 0.0, "l1", "none").blocks == {}


def test_equality_compares_blocks():
    assert make_report(blocks=BLOCKS) == make_report(blocks=dict(BLOCKS))
    assert make_report(blocks=BLOCKS) != make_report(blocks={**BLOCKS, "layer1.0": 0.0124})
    assert make_report(blocks=BLOCKS) != make_report(blocks={**BLOCKS, "layer1.1": 0.0})
    assert make_report(blocks=BLOCKS) != make_report(blocks={"layer1.0": 0.0123})
    assert make_report(blocks=BLOCKS) != make_report()
    # a default is not shared between reports
    a, b = (Report([], 1, 1, 1, 1, 0.0, "l1", "none") for _ in range(2))
    a.blocks["layer1.0"] = 0.1
    assert b.blocks == {}
