"""Prompt sets: built-in testbed sets and the file formats (text, CSV, sDCI YAML, MJHQ JSON, COCO JSON)."""

import json
import random

import pytest

from qsched.prompts import MJHQ_PROTOCOL_SIZE, PromptSet, load_prompts
from qsched.testbed import data


def test_heldout_default_matches_testbed_and_has_labels():
    ps = load_prompts(n=13, seed=3)
    prompts, labels = data.heldout_prompts(13, 3)
    assert ps.prompts == prompts and ps.labels == labels and ps.name == "testbed-heldout"
    assert len(load_prompts()) == len(data.all_captions("heldout")[0])


def test_calib_round_robin_wording_neither_trained_nor_evaluated():
    ps = load_prompts("testbed-calib", n=25, seed=1)
    assert ps.labels == [i % len(data.CLASS_NAMES) for i in range(25)]
    train = set(data.all_captions("train")[0])
    held = set(data.all_captions("heldout")[0])
    assert all(p not in train and p not in held for p in ps.prompts)
    for p, y in zip(ps.prompts, ps.labels):
        assert p in data.captions_for(y, "calib")
    assert len(set(ps.prompts)) == 25  # no repeats while the pool lasts
    assert len(set(load_prompts("testbed-calib").prompts)) == len(data.all_captions("calib")[0]) == 120
    # the three wordings share neither synonyms nor templates
    for c in range(len(data.CLASS_NAMES)):
        assert not set(data.CALIB_SYNONYMS[c]) & set(data.SYNONYMS[c][0] + data.SYNONYMS[c][1])
    assert not set(data.CALIB_TEMPLATES) & set(data.TRAIN_TEMPLATES + data.HELDOUT_TEMPLATES)
    assert load_prompts("testbed-calib", n=25, seed=1).prompts == ps.prompts
    assert load_prompts("testbed-calib", n=25, seed=2).prompts != ps.prompts


def test_text_file_skips_blank_and_comments(tmp_path):
    f = tmp_path / "p.txt"
    f.write_text("# header\n a cat \n\n#another\na dog\n", encoding="utf-8")
    ps = load_prompts(f)
    assert ps.prompts == ["a cat", "a dog"] and ps.labels is None and ps.name == "p"
    assert load_prompts(f, n=1).prompts == ["a cat"]


def test_csv_prompt_caption_and_first_column(tmp_path):
    a = tmp_path / "a.csv"
    a.write_text("id,prompt\n1,a red car\n2,\"a house, at night\"\n", encoding="utf-8")
    assert load_prompts(a).prompts == ["a red car", "a house, at night"]
    b = tmp_path / "b.csv"
    b.write_text("id,Caption\n1,x one\n2,x two\n", encoding="utf-8")
    assert load_prompts(b).prompts == ["x one", "x two"]
    c = tmp_path / "c.csv"
    c.write_text("a boat,3\na tree,4\n", encoding="utf-8")
    assert load_prompts(c).prompts == ["a boat", "a tree"]


def test_sdci_yaml_mapping_first_n_in_file_order(tmp_path):
    names = [f"sa_{i:05d}" for i in range(30, 0, -1)]  # not sorted: file order must be kept
    f = tmp_path / "sDCI.yaml"
    f.write_text("".join(f"{k}: 'A dense caption number {k}: with a colon'\n" for k in names), encoding="utf-8")
    ps = load_prompts(f, n=5)
    assert ps.ids == names[:5]
    assert ps.prompts[0] == f"A dense caption number {names[0]}: with a colon"
    shuffled = load_prompts(f, n=5, order="shuffle")
    keys = list(range(30))
    random.Random(0).shuffle(keys)
    assert shuffled.ids == [names[i] for i in sorted(keys[:5])]
    lst = tmp_path / "l.yaml"
    lst.write_text("- prompt: one\n- prompt: two\n- three\n", encoding="utf-8")
    assert load_prompts(lst).prompts == ["one", "two", "three"]
    # the loader finds sDCI.yaml inside a folder too
    assert load_prompts(tmp_path, n=2).ids == names[:2]


def test_mjhq_meta_data_protocol_subset(tmp_path):
    meta = {f"{i:040x}": {"prompt": f"prompt {i}", "category": ["people", "animals"][i % 2]} for i in range(40)}
    f = tmp_path / "meta_data.json"
    f.write_text(json.dumps(meta), encoding="utf-8")
    ps = load_prompts(f, n=10)
    keys = list(meta)
    random.Random(0).shuffle(keys)
    assert set(ps.ids) == set(keys[:10])
    assert ps.categories == [meta[k]["category"] for k in ps.ids]
    assert ps.prompts == [meta[k]["prompt"] for k in ps.ids]
    assert len(load_prompts(f)) == min(40, MJHQ_PROTOCOL_SIZE)
    # the folder form resolves meta_data.json
    assert load_prompts(tmp_path, n=10).ids == ps.ids


def test_coco_captions(tmp_path):
    f = tmp_path / "captions_val2017.json"
    f.write_text(json.dumps({"images": [], "annotations": [
        {"image_id": 1, "id": 10, "caption": "A man riding a horse. "},
        {"image_id": 2, "id": 11, "caption": "  "},
        {"image_id": 3, "id": 12, "caption": "Two dogs."}]}), encoding="utf-8")
    ps = load_prompts(f)
    assert ps.prompts == ["A man riding a horse.", "Two dogs."] and ps.ids == ["1", "3"]


def test_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="nope.txt"):
        load_prompts(tmp_path / "nope.txt")
    empty = tmp_path / "empty.txt"
    empty.write_text("# only a comment\n\n", encoding="utf-8")
    with pytest.raises(ValueError, match="no prompts in"):
        load_prompts(empty)
    with pytest.raises(ValueError):
        load_prompts("testbed-heldout", n=0)
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps({"a": {"text": "x"}}), encoding="utf-8")
    with pytest.raises(ValueError, match="prompt"):
        load_prompts(bad)


def test_promptset_roundtrip_and_validation():
    ps = load_prompts(n=4)
    assert PromptSet.from_dict(json.loads(json.dumps(ps.to_dict()))) == ps
    assert ps.take(2).prompts == ps.prompts[:2] and ps.take(2).labels == ps.labels[:2]
    with pytest.raises(ValueError, match="labels"):
        PromptSet(["a", "b"], [1])
