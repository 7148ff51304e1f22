"""ko-mini's recipe: corpus cleaning and deduplication (on made-up text) and the size sweep's arithmetic."""

import os
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "recipes"))

import ko_mini_corpus as corpus  # noqa: E402


@pytest.mark.parametrize(
    "line, expected",
    [
        ("김철수(, 1950년 3월 1일 ~ )는 가수이다.", "김철수(1950년 3월 1일 ~)는 가수이다."),
        ("서울(, , )은 수도이다.", "서울은 수도이다."),
        ("부산 ()은 항구이다.", "부산은 항구이다."),
        ("대구( )는 도시이다.", "대구는 도시이다."),
        ("이름(漢字, , 1900년 ~ 1990년)이다.", "이름(漢字, 1900년 ~ 1990년)이다."),
        ("하데스(: 저승의 신)는", "하데스(저승의 신)는"),
        ("제목(원제:)이다.", "제목(원제)이다."),
        ("영화 《》와 노래 〈 〉를", "영화와 노래를"),
        ("괄호 없는 문장이다.", "괄호 없는 문장이다."),
        ("함수 f(x, y)와 (1, 2)는 그대로다.", "함수 f(x, y)와 (1, 2)는 그대로다."),
    ],
)
def test_cleaning_removes_the_separators_and_brackets_left_by_stripped_links(line, expected):
    assert corpus.clean_extractor_fragments(line) == expected


def test_extractor_fragments_counts_each_bracket_group_cleaning_changes():
    assert corpus.extractor_fragments("가(, 1일 ~ )는 나()와 다(, )와 라(x)와 《》") == 4
    assert corpus.extractor_fragments("가(1일)는 (x, y)") == 0


def test_wiki_table_markup_lines_are_dropped_and_a_document_keeps_its_other_lines():
    document = '문서 제목\n! colspan="2" | 합계\n| 1 || 2\n본문(, )이다.'
    assert corpus.clean_document(document, corpus.clean_wikipedia_line) == "문서 제목\n본문이다."
    assert corpus.clean_document("!표\n|행", corpus.clean_wikipedia_line) == ""


def test_deduplication_drops_repeated_lines_across_and_within_documents():
    documents = ["배고파\n맛있게 드세요.", "출출해\n맛있게 드세요.", "배고파\n맛있게 드세요.", "안녕\n안녕\n반가워요."]
    assert list(corpus.drop_repeated_lines(documents)) == ["배고파\n맛있게 드세요.", "출출해", "안녕\n반가워요."]
    assert corpus.repeated_lines(documents) == 4


def test_source_documents_counts_what_cleaning_and_deduplication_did(tmp_path):
    articles = ["가나\n본문(, 1일)이다.\n!표", "다라\n같은 줄\n같은 줄"]
    source = corpus.Source(lambda data: iter(articles + ["더 읽지 않는 문서"]), corpus.clean_wikipedia_line)
    documents, counts = corpus.source_documents(source, tmp_path, limit=2)
    assert documents == ["가나\n본문(1일)이다.", "다라\n같은 줄"]
    assert counts == dict(
        documents_read=2,
        lines_read=6,
        extractor_fragments=1,
        lines_changed_by_cleaning=1,
        lines_dropped_by_cleaning=1,
        repeated_lines=1,
        lines_dropped_by_deduplication=1,
        documents=2,
        lines=4,
    )
    kept_as_read = corpus.Source(lambda data: iter(articles), deduplicate=False)
    kept, counts = corpus.source_documents(kept_as_read, tmp_path)
    assert kept == articles and counts["repeated_lines"] == 1 and counts["lines_dropped_by_deduplication"] == 0


def test_every_fiftieth_document_is_held_out():
    train, valid = corpus.split_validation([str(i) for i in range(120)])
    assert valid == ["49", "99"] and len(train) == 118


# --- the size sweep and the training record (ko_mini imports TensorFlow) ---


@pytest.fixture(scope="module")
def recipe():
    import ko_mini

    return ko_mini


def test_the_parameter_count_formula_matches_the_built_model(recipe):
    import numpy as np

    from tfgen import GPT2LM

    shape = recipe.Shape(n_layer=2, n_embd=128, vocab_size=300)
    lm = GPT2LM.from_config(shape.config(context=48, dropout=0.1))
    lm(np.array([[5, 6, 7]], np.int32))
    assert lm.gpt2.count_params() == shape.parameters(48)
    assert (lm.config.n_head, lm.config.resid_pdrop, lm.config.attn_pdrop) == (2, 0.1, 0.1)


def test_every_candidate_shape_fits_the_package_and_kogpt2_limits(recipe):
    profile = recipe.FULL
    assert profile.context >= 256
    for shape in profile.shapes:
        assert shape.package_bytes(profile.context) + 2**20 <= recipe.MAX_PACKAGE_BYTES  # 1 MiB: tokenizer, card
        assert shape.n_embd % recipe.HEAD_SIZE == 0


def test_candidates_get_equal_training_flops(recipe):
    profile = recipe.FULL
    tokens_per_step = profile.batch_size * profile.context
    for shape in profile.shapes:
        flops_per_step = shape.training_flops_per_token(profile.context) * tokens_per_step
        assert abs(profile.steps(shape, profile.sweep_flops) * flops_per_step - profile.sweep_flops) <= flops_per_step
    small, big = sorted(profile.shapes, key=lambda shape: shape.parameters(profile.context))[::3]
    assert profile.steps(small, profile.sweep_flops) > profile.steps(big, profile.sweep_flops)


def _result(shape, bits_per_character, tokens_per_second, package_bytes=40e6):
    return dict(
        shape=shape,
        package_bytes=package_bytes,
        greedy_tokens_per_second=tokens_per_second,
        validation=dict(bits_per_character=bits_per_character),
    )


def test_the_sweep_chooses_the_best_shape_within_the_limits(recipe):
    results = [_result("a", 3.9, 300), _result("b", 3.5, 90), _result("c", 3.6, 150), _result("d", 3.4, 200, 60e6)]
    assert recipe.choose_shape(results) == "c"
    with pytest.raises(SystemExit, match="tokens/s"):
        recipe.choose_shape([_result("b", 3.5, 90)])


def test_an_interrupted_run_is_recorded_up_to_its_last_checkpoint(recipe, tmp_path):
    state = tmp_path / "run" / "checkpoint" / "training_state" / "trainer_state.json"
    state.parent.mkdir(parents=True)
    state.write_text('{"epoch": 0, "step": 300}')
    saved = 1_800_000_000  # the checkpoint's time
    os.utime(state, (saved, saved))
    started = recipe.datetime.fromtimestamp(saved - 600, recipe.timezone.utc)
    entry = dict(stage="train", started=started.isoformat(timespec="seconds"), from_step=100)
    finished = dict(entry, stage="sweep a", to_step=50, tokens=1, seconds=1, ended="finished")
    runs = recipe._close_interrupted_runs([finished, entry], "train", tmp_path / "run", tokens_per_step=10)
    assert runs[0] == finished
    assert runs[1] == dict(entry, to_step=300, tokens=2000, seconds=600, ended="interrupted")


def test_a_new_work_folder_resumes_from_the_carried_rounds(recipe, spm_dir, tmp_path):
    import numpy as np

    from tfgen import GPT2LM
    from tfgen.tokenizer import Tokenizer

    tokenizer = Tokenizer.from_pretrained(spm_dir)
    shape = recipe.Shape(n_layer=1, n_embd=64, vocab_size=tokenizer.vocab_size)
    work = tmp_path / "work"
    run = dict(
        started="2026-12-02T09:00:00+00:00",
        from_step=0,
        to_step=5,
        tokens=50,
        seconds=60,
        ended="finished",
        machine=dict(cpu="x", cores=2, load_average_1min=0.1),
    )
    sweep_runs = [dict(run, stage=f"sweep {shape.name}"), dict(run, stage="sweep other")]
    rounds = [
        dict(round=number, steps=5, tokens=50, runs=[dict(run, stage=f"train round {number}")]) for number in (0, 1, 2)
    ]
    rounds[0]["runs"] = sweep_runs[:1]
    result = dict(
        _result(shape.name, 4.0, 300),
        **vars(shape),
        parameters=1,
        steps=5,
        tokens=50,
        training_flops=1.0,
        training_seconds=60,
        validation=dict(loss=3.0, bits_per_character=4.0),
    )
    (work / "corpus").mkdir(parents=True)
    recipe.write_json(work / "sweep.json", dict(flops_per_shape=1.0, results=[result], chosen=shape.name))
    recipe.write_json(work / "corpus" / "counts.json", dict(wikipedia=dict(documents=3)))
    recipe.write_json(work / "training_runs.json", sweep_runs + [r["runs"][0] for r in rounds[1:]])
    for entry in rounds:
        recipe.round_dir(work, entry["round"]).mkdir(parents=True)
        recipe.write_json(recipe.round_dir(work, entry["round"]) / "record.json", entry)
    trained = GPT2LM.from_config(shape.config(context=32, dropout=0.1), tokenizer)
    (recipe.round_dir(work, 2) / "final").mkdir()
    recipe.write_float16_model(trained, recipe.round_dir(work, 2) / "final")

    carried = tmp_path / "carried"
    recipe.carry(work, carried)
    fresh = tmp_path / "fresh"
    assert recipe.resume(fresh, carried) == dict(wikipedia=dict(documents=3))
    assert recipe.finished_rounds(fresh) == rounds
    assert recipe.read_json(fresh / "sweep.json") == recipe.read_json(work / "sweep.json")
    assert recipe.read_json(fresh / "training_runs.json") == recipe.read_json(work / "training_runs.json")
    profile = recipe.Profile(shapes=(recipe.Shape(2, 64, 300), shape))
    assert recipe.chosen_shape(fresh, profile) == shape and recipe.candidate_shapes(fresh, profile) == [shape]
    restored = GPT2LM.from_pretrained(recipe.round_dir(fresh, 2) / "final")
    shipped = GPT2LM.from_pretrained(recipe.round_dir(work, 2) / "final")
    for restored_weight, weight in zip(restored.gpt2.weights, shipped.gpt2.weights):
        np.testing.assert_array_equal(restored_weight.numpy(), weight.numpy())
    restored_tokenizer = Tokenizer.from_pretrained(recipe.tokenizer_dir(fresh, shape.vocab_size))
    assert restored_tokenizer.encode("근육이 커지기 위해서는") == tokenizer.encode("근육이 커지기 위해서는")


def test_a_round_starts_from_the_last_weights_with_its_own_dropout(recipe, spm_dir, tmp_path):
    import numpy as np

    from tfgen import GPT2LM
    from tfgen.tokenizer import Tokenizer

    tokenizer = Tokenizer.from_pretrained(spm_dir)
    shape = recipe.Shape(n_layer=1, n_embd=64, vocab_size=tokenizer.vocab_size)
    previous = tmp_path / "previous"
    previous.mkdir()
    recipe.write_float16_model(GPT2LM.from_config(shape.config(context=32, dropout=0.0), tokenizer), previous)
    recipe.continued_model(previous, dropout=0.1)(tmp_path / "initial")
    start, before = GPT2LM.from_pretrained(tmp_path / "initial"), GPT2LM.from_pretrained(previous)
    assert (start.config.resid_pdrop, start.config.attn_pdrop, start.config.embd_pdrop) == (0.1, 0.1, 0.1)
    for weight, previous_weight in zip(start.gpt2.weights, before.gpt2.weights):
        np.testing.assert_array_equal(weight.numpy(), previous_weight.numpy())


def test_each_round_peaks_lower(recipe):
    profile = recipe.FULL
    rates = [profile.round_learning_rate(number) for number in range(1, profile.rounds + 1)]
    assert rates[0] < profile.learning_rate and all(later < earlier for earlier, later in zip(rates, rates[1:]))
