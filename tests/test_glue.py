"""GLUE TSV readers (standard column layouts, label sets, test splits) and their one-line errors."""

import pytest
from transformers import BertConfig

from attattr_fast.errors import AttAttrError
from attattr_fast.glue import class_indices, label_set, read_glue, read_task, task_spec

MNLI_HEADER = ("index\tpromptID\tpairID\tgenre\tsentence1_binary_parse\tsentence2_binary_parse\tsentence1_parse\t"
               "sentence2_parse\tsentence1\tsentence2\tlabel1\tlabel2\tlabel3\tlabel4\tlabel5\tgold_label")


def _write(tmp_path, name, lines):
    path = tmp_path / name
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path


def _mnli_row(i, premise, hypothesis, gold):
    return "\t".join([str(i), "1", f"{i}e", "fiction", "( x )", "( y )", "(ROOT x)", "(ROOT y)", premise, hypothesis,
                      gold, gold, gold, gold, gold, gold])  # fmt: skip


def test_sst2_train_and_test_splits(tmp_path):
    train = _write(tmp_path, "train.tsv", ["sentence\tlabel", 'it \'s a "charming" film \t1', "dull and flat\t0"])
    data = read_glue(train, "SST-2")
    assert [(e.text, e.text_pair, e.label) for e in data.examples] == [
        ('it \'s a "charming" film', None, "1"), ("dull and flat", None, "0")]  # quotes kept verbatim
    assert data.labels == ("0", "1") and data.label_names == ("negative", "positive")
    test = read_glue(_write(tmp_path, "test.tsv", ["index\tsentence", "0\tuntitled", "1\ta gem"]), "sst2")
    assert [(e.text, e.label) for e in test.examples] == [("untitled", None), ("a gem", None)]


@pytest.mark.parametrize("name", ["dev_matched.tsv", "dev_mismatched.tsv"])
def test_mnli_matched_and_mismatched(tmp_path, name):
    path = _write(tmp_path, name, [MNLI_HEADER, _mnli_row(0, "A man sleeps.", "A person rests.", "entailment"),
                                   _mnli_row(1, "It rains.", "It is dry.", "contradiction")])  # fmt: skip
    data = read_glue(path, "mnli-mm" if "mis" in name else "mnli")
    assert [(e.text, e.text_pair, e.label) for e in data.examples] == [
        ("A man sleeps.", "A person rests.", "entailment"), ("It rains.", "It is dry.", "contradiction")]
    assert data.labels == ("contradiction", "entailment", "neutral")


def test_rte_qnli_mrpc_qqp_stsb_cola_layouts(tmp_path):
    rte = read_glue(_write(tmp_path, "rte.tsv", ["index\tsentence1\tsentence2\tlabel",
                                                 "0\tCats purr.\tCats make sounds.\tentailment"]), "rte")  # fmt: skip
    assert (rte.examples[0].text_pair, rte.examples[0].label) == ("Cats make sounds.", "entailment")
    qnli = read_glue(_write(tmp_path, "qnli.tsv", ["index\tquestion\tsentence\tlabel",
                                                   "0\tWho?\tNobody.\tnot_entailment"]), "qnli")  # fmt: skip
    assert (qnli.examples[0].text, qnli.examples[0].text_pair, qnli.examples[0].label) == ("Who?", "Nobody.",
                                                                                            "not_entailment")
    mrpc = read_glue(_write(tmp_path, "mrpc.tsv", ["\ufeffQuality\t#1 ID\t#2 ID\t#1 String\t#2 String",
                                                   "1\t11\t12\tHe left .\tHe went away ."]), "mrpc")  # fmt: skip
    assert (mrpc.examples[0].text, mrpc.examples[0].text_pair, mrpc.examples[0].label) == ("He left .",
                                                                                            "He went away .", "1")
    qqp = read_glue(_write(tmp_path, "qqp.tsv", ["id\tqid1\tqid2\tquestion1\tquestion2\tis_duplicate",
                                                 "7\t1\t2\tHow?\tWhy?\t0"]), "qqp")  # fmt: skip
    assert (qqp.examples[0].text_pair, qqp.examples[0].label, qqp.label_names) == ("Why?", "0",
                                                                                   ("not_duplicate", "duplicate"))
    stsb = read_glue(_write(tmp_path, "sts.tsv", [
        "index\tgenre\tfilename\tyear\told_index\tsource1\tsource2\tsentence1\tsentence2\tscore",
        "0\tmain-captions\tMSRvid\t2012test\t0001\tnone\tnone\tA plane takes off.\tA plane is taking off.\t5.000"]),
        "sts-b")  # fmt: skip
    assert stsb.regression and stsb.examples[0].label == "5.000"
    with pytest.raises(AttAttrError, match="regression task"):
        label_set(stsb)
    with pytest.raises(AttAttrError, match="regression task"):  # heads / prune, not "unknown label '5.000'"
        class_indices(stsb, BertConfig(num_labels=2))
    cola = read_glue(_write(tmp_path, "cola.tsv", ["gj04\t1\t\tOur friends won't buy this analysis.",
                                                   "gj04\t0\t*\tThey drank the pub."]), "cola")  # fmt: skip
    assert [(e.text, e.label) for e in cola.examples] == [("Our friends won't buy this analysis.", "1"),
                                                          ("They drank the pub.", "0")]  # fmt: skip
    cola_test = read_glue(_write(tmp_path, "cola_test.tsv", ["index\tsentence", "0\tBill whistled."]), "cola")
    assert cola_test.examples[0].text == "Bill whistled." and cola_test.examples[0].label is None


@pytest.mark.parametrize("lines, task, message", [
    (["text\tlabel", "good\t1"], "sst2", "no 'sentence' column for task sst2 (found: text, label)"),
    (["sentence\tlabel", "good\t2"], "sst2", ":2: unknown sst2 label '2'; expected one of 0, 1"),
    (["index\tsentence1\tsentence2\tlabel", "0\ta\tb\tentailed"], "rte", ":2: unknown rte label 'entailed'"),
    (["index\tsentence1\tsentence2\tlabel", "0\ta"], "rte", ":2: 2 tab-separated fields, expected 4"),
    (["index\tsentence1\tsentence2\tlabel", "0\ta\t \tentailment"], "rte", ":2: empty text"),
    (["gj04\t1\tHello."], "cola", ":1: 3 tab-separated fields, expected 4"),
    (["gj04\t1\t\tHe said\tyes."], "cola", ":1: 5 tab-separated fields, expected 4"),  # a tab inside the text
    (["sentence\tlabel", "good\t1\textra"], "sst2", ":2: 3 tab-separated fields, expected 2"),
    (["sentence\tlabel"], "sst2", "no examples"),
    (["sentence\tlabel", "a\t1"], "glue9", "unknown task 'glue9'"),
    ([MNLI_HEADER.replace("gold_label", "gold"), _mnli_row(0, "a", "b", "neutral")], "mnli", None),
])  # fmt: skip
def test_errors_name_the_file_line_and_problem(tmp_path, lines, task, message):
    path = _write(tmp_path, "data.tsv", lines)
    if message is None:  # an MNLI file without gold_label reads like a test split: no labels
        assert read_glue(path, task).examples[0].label is None
        return
    with pytest.raises(AttAttrError) as info:
        read_glue(path, task)
    assert message in str(info.value) and "\n" not in str(info.value)


def test_only_newlines_end_rows(tmp_path):
    # U+2028, NEL and form feed are characters of a text, not line ends; CRLF files read the same
    path = tmp_path / "train.tsv"
    path.write_bytes("sentence\tlabel\r\nfoo\x85bar\u2028baz\x0cqux\t1\r\n".encode())
    assert [(e.text, e.label) for e in read_glue(path, "sst2").examples] == [("foo\x85bar\u2028baz\x0cqux", "1")]


def test_missing_file_and_non_utf8(tmp_path):
    with pytest.raises(AttAttrError, match="input file not found"):
        read_glue(tmp_path / "nope.tsv", "sst2")
    bad = tmp_path / "latin.tsv"
    bad.write_bytes(b"sentence\tlabel\ncaf\xe9\t1\n")
    with pytest.raises(AttAttrError, match="not UTF-8"):
        read_glue(bad, "sst2")


def test_class_indices_through_label_names_or_task_order(tmp_path):
    data = read_glue(_write(tmp_path, "d.tsv", ["sentence\tlabel", "a\t1", "b\t0", "c\t1"]), "sst2")
    named = BertConfig(num_labels=2, id2label={0: "positive", 1: "negative"}, label2id={"positive": 0, "negative": 1})
    assert class_indices(data, named) == [0, 1, 0]  # "1" is positive, which this model calls class 0
    assert class_indices(data, BertConfig(num_labels=2)) == [1, 0, 1]  # LABEL_k names: the task's order
    with pytest.raises(AttAttrError, match="sst2 has 2 classes, the model has 3"):
        class_indices(data, BertConfig(num_labels=3))
    generic = read_task(_write(tmp_path, "g.tsv", ["text\tlabel", "a\tpositive", "b\tmeh"]), "generic")
    with pytest.raises(AttAttrError, match="unknown label 'meh'"):
        class_indices(generic, named)


def test_label_set_of_generic_data(tmp_path):
    data = read_task(_write(tmp_path, "g.tsv", ["text\tlabel", "a\t10", "b\t2", "c\t2"]), "generic")
    assert label_set(data) == (("2", "10"), ("2", "10"))  # integers sort numerically
    assert label_set(data, ["10", "2"]) == (("10", "2"), ("10", "2"))
    with pytest.raises(AttAttrError, match="label '10' of the data is not among the given labels 2, 3"):
        label_set(data, ["2", "3"])
    assert task_spec("MNLI-MM").name == "mnli"
