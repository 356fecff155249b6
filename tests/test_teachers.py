"""Teachers: the local one against `token_logprobs`, the served clients against a fake in-process server that
answers in vLLM's and SGLang's documented shapes (and misbehaves on demand). Token lists are scored through
`score_sequences`, which lays them out as rollouts for `Teacher.score`."""

import json
import random
import socket
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest
import torch

from opdplus.logprobs import token_logprobs
from opdplus.teachers import (
    LocalTeacher,
    SGLangTeacher,
    Teacher,
    TeacherUnavailableError,
    VLLMTeacher,
    get_teacher,
    score_sequences,
)
from opdplus.teachers.base import TokenRows
from opdplus.teachers.routing import TeacherRouter
from opdplus.teachers.sequences import from_sequences
from opdplus.tiny import build_char_tokenizer

FAST = {"backoff": 0.01, "max_retries": 2, "timeout": 5.0}  # retries without slowing the suite


def random_sequences(count, vocab, seed=0, min_len=2, max_len=30):
    rng = random.Random(seed)
    sequences = [[rng.randrange(vocab) for _ in range(rng.randint(min_len, max_len))] for _ in range(count)]
    starts = [rng.randint(1, len(ids)) for ids in sequences]  # start == len: nothing to score
    return sequences, starts


# ---------------------------------------------------------------- local teacher


@pytest.fixture(scope="module")
def local(models):
    return get_teacher(models["teacher"], batch_size=3)  # small batches: several forwards, padding in each


def test_local_teacher_equals_token_logprobs_per_sequence(local):
    sequences, starts = random_sequences(10, len(local.tokenizer))
    scores = score_sequences(local, sequences, starts)
    for ids, begin, score in zip(sequences, starts, scores):
        assert score.dtype == torch.float32 and score.shape == (len(ids) - begin,)
        if begin == len(ids):
            continue
        with torch.no_grad():
            expected = token_logprobs(local.model, torch.tensor([ids]), torch.ones(1, len(ids)), start=begin)[0]
        torch.testing.assert_close(score, expected, atol=1e-5, rtol=0)


@pytest.mark.parametrize("temperature", [1.0, 2.0])
def test_local_teacher_scores_samples_of_one_prompt_as_if_scored_apart(models, temperature):
    # several samples per prompt take the shared-prompt path (each prompt's prefix runs once), prompts of
    # different lengths included; it must give what scoring every row on its own gives
    teacher = get_teacher(models["teacher"], temperature=temperature)
    prompts, _ = random_sequences(4, len(teacher.tokenizer), seed=1, min_len=1, max_len=12)
    responses, _ = random_sequences(12, len(teacher.tokenizer), seed=2, min_len=1, max_len=9)
    sequences = [prompts[row % 4] + response for row, response in enumerate(responses)]
    starts = [len(prompts[row % 4]) for row in range(12)]
    shared = score_sequences(teacher, sequences, starts)
    for ids, begin, score in zip(sequences, starts, shared):
        alone = score_sequences(teacher, [ids], [begin])[0]  # one row: no prompt to share
        assert score.shape == alone.shape
        torch.testing.assert_close(score, alone, atol=2e-5, rtol=0)


def test_local_teacher_start_handling(local):
    sequences = [[5, 6, 7, 8], [9, 10]]
    default = score_sequences(local, sequences)
    assert [len(score) for score in default] == [3, 1]
    later = score_sequences(local, sequences, [3, 2])
    assert [len(score) for score in later] == [1, 0]
    torch.testing.assert_close(later[0], default[0][2:])
    with pytest.raises(ValueError, match="start must be in"):
        score_sequences(local, sequences, [0, 1])
    with pytest.raises(ValueError, match="start must be in"):
        score_sequences(local, sequences, [1, 3])
    with pytest.raises(ValueError, match="2 sequences"):
        score_sequences(local, sequences, [1])
    assert score_sequences(local, []) == []


def test_local_teacher_is_frozen(local):
    assert not local.model.training
    assert not any(parameter.requires_grad for parameter in local.model.parameters())


def test_local_teacher_temperature_divides_logits(models):
    tempered = get_teacher(models["teacher"], temperature=2.0)
    ids = [3, 15, 16, 17, 6, 7, 2]
    with torch.no_grad():
        logits = tempered.model(torch.tensor([ids])).logits[0, :-1].float() / 2.0
    expected = logits.log_softmax(-1).gather(-1, torch.tensor(ids[1:])[:, None]).squeeze(-1)
    torch.testing.assert_close(score_sequences(tempered, [ids])[0], expected, atol=1e-5, rtol=0)
    with pytest.raises(ValueError, match="positive"):
        get_teacher(models["teacher"], temperature=0.0)


def test_local_teacher_tokenizer_check(local):
    local.check_tokenizer(build_char_tokenizer())
    other = build_char_tokenizer()
    other.add_tokens(["<|extra|>"])
    with pytest.raises(ValueError, match="tokenizer mismatch between student and teacher"):
        local.check_tokenizer(other)


def test_get_teacher_dispatch(models):
    teacher = get_teacher(models["teacher"])
    assert isinstance(teacher, LocalTeacher) and isinstance(teacher, Teacher)
    with pytest.raises(ValueError, match="unknown teacher api"):
        get_teacher("http://127.0.0.1:1", api="triton")
    with pytest.raises(ValueError, match="served teachers"):
        get_teacher(models["teacher"], api="vllm")


# ---------------------------------------------------------------- a fake vLLM / SGLang server


def fake_logprob(ids, position):
    """The fake model's log p(ids[position] | ids[:position]): depends on the token and its context."""
    top_ids, top_values = fake_top(ids, position, FAKE_TOP)
    if ids[position] in top_ids:
        return top_values[top_ids.index(ids[position])]
    return -0.01 * (ids[position] + 3 * position + ids[position - 1]) - 2.0


FAKE_TOP = 64  # the fake model's most likely tokens at each position: the previous token + 0, 1, 2, ... (mod 101)


def fake_top(ids, position, k):
    """The fake model's k most likely next tokens after ids[:position] (context only) and their log-probs."""
    return ([(ids[position - 1] + j) % 101 for j in range(k)],
            [-0.01 * (j + 1) - 0.001 * position for j in range(k)])


class FakeServer:
    """ThreadingHTTPServer on a free port. Behaviour is set per test through attributes:
    `fail_first` (statuses answered before behaving), `mutate` (edits each answer), `delay` (seconds)."""

    def __init__(self, models=("teacher",)):
        self.models, self.fail_first, self.mutate, self.delay = list(models), [], None, 0.0
        self.tokenizer = build_char_tokenizer()
        self.requests = []
        fake = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args):  # keep pytest output clean
                pass

            def do_GET(self):
                self.answer(None)

            def do_POST(self):
                self.answer(json.loads(self.rfile.read(int(self.headers["Content-Length"]))))

            def answer(self, payload):
                status, body = fake.route(self.command, self.path, payload)
                data = body if isinstance(body, bytes) else json.dumps(body).encode()
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}"
        threading.Thread(target=self.httpd.serve_forever, kwargs={"poll_interval": 0.02}, daemon=True).start()

    def route(self, method, path, payload):
        self.requests.append((method, path, payload))
        time.sleep(self.delay)
        if self.fail_first:
            status = self.fail_first.pop(0)
            return status, {"error": {"message": f"fake error {status}\nsecond line"}}
        if (method, path) == ("GET", "/v1/models"):
            body = {"object": "list", "data": [{"id": name, "object": "model"} for name in self.models]}
        elif (method, path) == ("POST", "/tokenize"):
            body = {"count": 0, "tokens": self.tokenizer.encode(payload["prompt"], add_special_tokens=False)}
        elif (method, path) == ("POST", "/v1/completions"):
            body = self.vllm_completions(payload)
        elif (method, path) == ("POST", "/generate"):
            body = self.sglang_generate(payload)
        else:
            return 404, {"detail": "Not Found"}
        return 200, self.mutate(body) if self.mutate else body

    def vllm_completions(self, payload):
        """With prompt_logprobs K > 0, vLLM's shape: the top K by rank 1 .. K, and the prompt token's own entry
        (its true rank) only when it is not among them."""
        choices, top_k = [], payload["prompt_logprobs"]
        for index, ids in enumerate(payload["prompt"]):
            prompt_logprobs = [None]
            for k in range(1, len(ids)):
                top_ids, top_values = fake_top(ids, k, FAKE_TOP)
                own_rank = top_ids.index(ids[k]) + 1 if ids[k] in top_ids else FAKE_TOP + 1
                entry = {str(ids[k]): {"logprob": fake_logprob(ids, k), "rank": own_rank, "decoded_token": "x"}}
                entry.update({str(token): {"logprob": value, "rank": rank, "decoded_token": "x"}
                              for rank, (token, value) in enumerate(zip(top_ids[:top_k], top_values), start=1)})
                prompt_logprobs.append(entry)
            choices.append({"index": index, "text": "x", "token_ids": [7], "prompt_logprobs": prompt_logprobs,
                            "prompt_token_ids": list(ids), "finish_reason": "length"})
        random.Random(len(choices)).shuffle(choices)  # clients must map choices back by index
        return {"object": "text_completion", "model": payload["model"], "choices": choices}

    def sglang_generate(self, payload):
        results = []
        for ids in payload["input_ids"]:
            entries = [[None, ids[0], "x"]] + [[fake_logprob(ids, k), ids[k], "x"] for k in range(1, len(ids))]
            meta_info = {"input_token_logprobs": entries}
            if payload.get("top_logprobs_num"):  # SGLang's shape: per position a list of [logprob, id, text]
                meta_info["input_top_logprobs"] = [None] + [
                    [[value, token, "x"] for token, value in zip(*fake_top(ids, k, payload["top_logprobs_num"]))]
                    for k in range(1, len(ids))]
            results.append({"text": "", "output_ids": [], "meta_info": meta_info})
        return results

    def close(self):
        self.httpd.shutdown()
        self.httpd.server_close()


@pytest.fixture
def server():
    fake = FakeServer()
    yield fake
    fake.close()


def expected_scores(sequences, starts):
    return [torch.tensor([fake_logprob(ids, k) for k in range(begin, len(ids))], dtype=torch.float32)
            for ids, begin in zip(sequences, starts)]


def assert_one_line_naming(error, url):
    message = str(error.value)
    assert url in message and "\n" not in message, message


def test_router_scores_a_rollouts_batch_into_one_tensor(local, server):
    # samples of prompts of different lengths, responses of different lengths (one empty), two teachers
    served = get_teacher(server.url, batch_size=2, **FAST)
    prompts, _ = random_sequences(3, len(local.tokenizer), seed=3, min_len=1, max_len=9)
    responses, _ = random_sequences(9, len(local.tokenizer), seed=4, min_len=1, max_len=11)
    responses[4] = []  # nothing to score
    sequences = [prompts[row // 3] + response for row, response in enumerate(responses)]
    starts = [len(prompts[row // 3]) for row in range(9)]
    rollouts = from_sequences(sequences, starts, pad_id=local.pad_id)
    routes = ["far" if row % 4 == 1 else None for row in range(9)]
    scores = TeacherRouter({"default": local, "far": served}).score(rollouts, routes)
    assert scores.dtype == torch.float32 and scores.shape == (9, rollouts.input_ids.shape[1] - rollouts.prompt_length)
    for row, (ids, begin) in enumerate(zip(sequences, starts)):
        alone = score_sequences(served if routes[row] else local, [ids], [begin])[0]
        torch.testing.assert_close(scores[row, : len(alone)], alone, atol=2e-5, rtol=0)
        assert (scores[row, len(alone) :] == 0).all()


@pytest.mark.parametrize("api", ["vllm", "sglang"])
def test_served_teacher_scores_in_batches(server, api):
    teacher = get_teacher(server.url, api=api, batch_size=3, concurrency=2, **FAST)
    assert isinstance(teacher, Teacher) and teacher.model == "teacher"  # the single model /v1/models lists
    sequences, starts = random_sequences(11, 101, seed=1)
    scores = score_sequences(teacher, sequences, starts)
    for score, expected in zip(scores, expected_scores(sequences, starts)):
        assert score.dtype == torch.float32
        torch.testing.assert_close(score, expected)
    scoring = [payload for method, path, payload in server.requests if method == "POST"]
    assert len(scoring) == 4  # 11 sequences in batches of 3
    assert teacher.client.bytes_received > 0


def test_vllm_request_shape(server):
    teacher = VLLMTeacher(server.url, model="teacher", **FAST)
    score_sequences(teacher, [[5, 6, 7]])
    assert server.requests == [("POST", "/v1/completions", {
        "model": "teacher", "prompt": [[5, 6, 7]], "max_tokens": 1, "prompt_logprobs": 0,
        "return_token_ids": True})]


def test_sglang_request_shape(server):
    teacher = SGLangTeacher(server.url, model="teacher", **FAST)
    score_sequences(teacher, [[5, 6, 7]])
    assert server.requests == [("POST", "/generate", {
        "input_ids": [[5, 6, 7]], "sampling_params": {"max_new_tokens": 0}, "return_logprob": True,
        "logprob_start_len": 0})]


@pytest.mark.parametrize("api", ["vllm", "sglang"])
def test_retries_after_two_503s(server, api):
    teacher = get_teacher(server.url, api=api, model="teacher", **FAST)
    server.fail_first = [503, 503]
    torch.testing.assert_close(score_sequences(teacher, [[4, 5, 6]])[0], expected_scores([[4, 5, 6]], [1])[0])
    assert len(server.requests) == 3


def test_5xx_until_retries_run_out(server):
    teacher = get_teacher(server.url, model="teacher", **FAST)
    server.fail_first = [500, 502, 503]
    with pytest.raises(TeacherUnavailableError) as error:
        score_sequences(teacher, [[4, 5, 6]])
    assert_one_line_naming(error, server.url)
    assert "HTTP 503" in str(error.value)


def test_400_is_a_one_line_error_without_retry(server):
    teacher = get_teacher(server.url, model="teacher", **FAST)
    server.fail_first = [400]
    with pytest.raises(ValueError, match="HTTP 400") as error:
        score_sequences(teacher, [[4, 5, 6]])
    assert_one_line_naming(error, server.url)
    assert len(server.requests) == 1


def test_dead_port_raises_teacher_unavailable_fast():
    with socket.socket() as probe:  # a port nothing listens on
        probe.bind(("127.0.0.1", 0))
        url = f"http://127.0.0.1:{probe.getsockname()[1]}"
    began = time.perf_counter()
    with pytest.raises(TeacherUnavailableError) as error:
        get_teacher(url, **FAST)  # model discovery is the first request
    assert time.perf_counter() - began < 2
    assert_one_line_naming(error, url)
    teacher = get_teacher(url, model="teacher", **FAST)
    with pytest.raises(TeacherUnavailableError):
        score_sequences(teacher, [[4, 5, 6]])


def test_timeout_is_retried_then_unavailable(server):
    teacher = get_teacher(server.url, model="teacher", backoff=0.01, max_retries=1, timeout=0.2)
    server.delay = 0.5
    with pytest.raises(TeacherUnavailableError, match="timed out"):
        score_sequences(teacher, [[4, 5, 6]])
    assert len(server.requests) == 2


def drop_prompt_logprobs(body):
    del body["choices"][0]["prompt_logprobs"]
    return body


def wrong_key(body):
    choice = body["choices"][0]
    choice["prompt_logprobs"][1] = {"99999": {"logprob": -1.0, "rank": 1, "decoded_token": "?"}}
    return body


def changed_echo(body):
    body["choices"][0]["prompt_token_ids"][1] += 1
    return body


@pytest.mark.parametrize("mutate, message", [
    (lambda body: {"oops": True}, "no choices"),
    (drop_prompt_logprobs, "prompt_logprobs is not a list"),
    (wrong_key, "no logprob for token"),
    (lambda body: {"choices": body["choices"][:0]}, "choice indices"),
    (changed_echo, "other token ids than sent"),
])
def test_vllm_malformed_answers(server, mutate, message):
    teacher = get_teacher(server.url, model="teacher", **FAST)
    server.mutate = mutate
    with pytest.raises(ValueError, match=message) as error:
        score_sequences(teacher, [[4, 5, 6]])
    assert_one_line_naming(error, server.url)


def sglang_changed_token(results):
    results[0]["meta_info"]["input_token_logprobs"][2][1] += 1
    return results


@pytest.mark.parametrize("mutate, message", [
    (lambda results: [], "expected a list of 1 results"),
    (lambda results: [{"meta_info": {}}], "no meta_info.input_token_logprobs"),
    (lambda results: [{"meta_info": {"input_token_logprobs": [[None, 4, "x"], [-1.0], [-1.0]]}}], "entries"),
    (sglang_changed_token, "other token ids than sent"),
])
def test_sglang_malformed_answers(server, mutate, message):
    teacher = get_teacher(server.url, api="sglang", model="teacher", **FAST)
    server.mutate = mutate
    with pytest.raises(ValueError, match=message) as error:
        score_sequences(teacher, [[4, 5, 6]])
    assert_one_line_naming(error, server.url)


def test_non_json_answer(server):
    teacher = get_teacher(server.url, model="teacher", **FAST)
    server.mutate = lambda body: b"<html>\nproxy error</html>"
    with pytest.raises(ValueError, match="non-JSON") as error:
        score_sequences(teacher, [[4, 5, 6]])
    assert_one_line_naming(error, server.url)


@pytest.mark.parametrize("api", ["vllm", "sglang"])
def test_served_tokenizer_check(server, api):
    teacher = get_teacher(server.url, api=api, **FAST)
    teacher.check_tokenizer(build_char_tokenizer())
    probes = [payload["prompt"] for method, path, payload in server.requests if path == "/tokenize"]
    assert any("<|end|>" in text for text in probes) and any(any(c.isdigit() for c in text) for text in probes)
    server.tokenizer = build_char_tokenizer()
    server.tokenizer.add_tokens(["12"])  # the server splits digits differently from the student
    with pytest.raises(ValueError, match="tokenizer mismatch between student and teacher") as error:
        teacher.check_tokenizer(build_char_tokenizer())
    assert_one_line_naming(error, server.url)


def test_served_model_name_checks():
    fake = FakeServer(models=("a", "b"))
    try:
        with pytest.raises(ValueError, match="serves 2 models"):
            get_teacher(fake.url, **FAST)
        assert get_teacher(fake.url, model="b", **FAST).model == "b"
        with pytest.raises(ValueError, match="does not serve model 'c'"):
            get_teacher(fake.url, model="c", **FAST).check_tokenizer(build_char_tokenizer())
    finally:
        fake.close()


def test_served_teacher_refuses_temperature(server):
    with pytest.raises(ValueError, match="temperature 0.7 is not supported"):
        get_teacher(server.url, model="teacher", temperature=0.7)


# ---------------------------------------------------------------- served top-k (--estimator topk:K)


def top_k_rollouts(seed=5):
    """Rows of prompts and responses of different lengths (one empty); about half the response tokens are among
    the fake model's top 4 at their position, half not (the vLLM answer then holds an extra entry)."""
    rng = random.Random(seed)
    sequences, starts = [], []
    for row in range(7):
        ids = [rng.randrange(101) for _ in range(rng.randint(1, 5))]
        starts.append(len(ids))
        for _ in range(0 if row == 3 else rng.randint(1, 12)):
            ids.append((ids[-1] + rng.randrange(8)) % 101)
        sequences.append(ids)
    return sequences, starts, from_sequences(sequences, starts)


@pytest.mark.parametrize("api", ["vllm", "sglang"])
def test_served_top_k_is_exactly_the_teachers_top_k(server, api):
    teacher = get_teacher(server.url, api=api, batch_size=3, concurrency=2, **FAST)
    teacher.check_tokenizer(build_char_tokenizer())  # ids are then checked against the 101-token vocabulary
    sequences, starts, rollouts = top_k_rollouts()
    scores, top = teacher.distribution(rollouts, top_k=4)
    width = rollouts.input_ids.shape[1] - rollouts.prompt_length
    assert top.token_ids.shape == top.logprobs.shape[:2] + (4,) == (7, width, 4)
    assert top.token_ids.dtype == torch.long and top.logprobs.dtype == scores.dtype == torch.float32
    torch.testing.assert_close(scores, teacher.score(rollouts), atol=0, rtol=0)
    outside = 0
    for row, (ids, begin) in enumerate(zip(sequences, starts)):
        for t, position in enumerate(range(begin, len(ids))):
            expected_ids, expected_values = fake_top(ids, position, 4)
            assert top.token_ids[row, t].tolist() == expected_ids  # never the sampled token in place of one
            torch.testing.assert_close(top.logprobs[row, t], torch.tensor(expected_values))
            outside += ids[position] not in expected_ids
        after_end = slice(len(ids) - begin, None)
        assert (top.token_ids[row, after_end] == 0).all() and (top.logprobs[row, after_end] == 0).all()
    assert 0 < outside < sum(len(ids) - begin for ids, begin in zip(sequences, starts))  # both cases were met
    asked = [payload for method, path, payload in server.requests if path in ("/v1/completions", "/generate")]
    key = "prompt_logprobs" if api == "vllm" else "top_logprobs_num"
    assert len(asked) == 2 * 3 and {payload[key] for payload in asked[:3]} == {4}  # 7 rows in batches of 3


def test_router_top_k_mixes_a_served_and_a_local_teacher(local, server):
    served = get_teacher(server.url, batch_size=2, **FAST)
    sequences, starts, rollouts = top_k_rollouts(seed=6)
    routes = ["far" if row % 2 else None for row in range(7)]
    scores, top = TeacherRouter({"default": local, "far": served}).distribution(rollouts, routes, 3)
    for row in range(7):
        teacher = served if routes[row] else local
        alone_scores, alone = teacher.distribution(TokenRows.select(rollouts, [row]), 3)
        torch.testing.assert_close(scores[row], alone_scores[0], atol=2e-5, rtol=0)
        length = len(sequences[row]) - starts[row]  # past it the local teacher's top-k is of padding: unused
        assert top.token_ids[row, :length].tolist() == alone.token_ids[0, :length].tolist()
        torch.testing.assert_close(top.logprobs[row, :length], alone.logprobs[0, :length], atol=2e-5, rtol=0)


@pytest.mark.parametrize("api", ["vllm", "sglang"])
def test_served_dense_is_a_one_line_error(local, server, api):
    teacher = get_teacher(server.url, api=api, model="teacher", **FAST)
    assert isinstance(teacher, Teacher) and isinstance(local, Teacher)  # every teacher offers `distribution`
    _, _, rollouts = top_k_rollouts()
    message = ("--estimator dense needs a local teacher (the whole vocabulary at every position); with a served "
               "teacher use --estimator topk:K")
    with pytest.raises(ValueError) as error:
        teacher.distribution(rollouts, None)
    assert str(error.value) == message
    with pytest.raises(ValueError) as error:
        TeacherRouter({"default": teacher}).distribution(rollouts, [None] * 7, None)
    assert str(error.value) == message
    assert not [path for _, path, _ in server.requests if path != "/v1/models"]  # refused before any request


def vllm_top_entry(body, change):
    """Apply `change` to position 2 of the first choice's prompt_logprobs (a dict id -> {logprob, rank})."""
    change(body["choices"][0]["prompt_logprobs"][2])
    return body


def drop_rank_2(entry):
    del entry[next(key for key, value in entry.items() if value["rank"] == 2)]


def repeat_rank_1(entry):
    next(value for value in entry.values() if value["rank"] == 2)["rank"] = 1


def positive_logprob(entry):
    next(value for value in entry.values() if value["rank"] == 1)["logprob"] = 0.5


def out_of_vocabulary(entry):
    key = next(key for key, value in entry.items() if value["rank"] == 4)
    entry["101"] = entry.pop(key)


@pytest.mark.parametrize("change, message", [
    (drop_rank_2, r"ranks \[1, 3, 4, 65\] are not 1 \.\. 4"),
    (repeat_rank_1, r"ranks \[1, 1, 3, 4\] are not 1 \.\. 4"),
    (positive_logprob, "a log-prob must be a finite number <= 0"),
    (out_of_vocabulary, r"are not all in \[0, 101\)"),
    (lambda entry: entry.update({"50": {"logprob": -9.0, "rank": 9}, "51": {"logprob": -9.5, "rank": 10}}),
     r"ranks \[1, 2, 3, 4, 9, 10, 65\]"),
])
def test_vllm_malformed_top_k(server, change, message):
    teacher = get_teacher(server.url, model="teacher", **FAST)
    teacher.check_tokenizer(build_char_tokenizer())
    server.mutate = lambda body: vllm_top_entry(body, change)
    rollouts = from_sequences([[4, 5, 90, 7]], [1])  # 90 is outside the top 4 at position 2: an extra entry
    with pytest.raises(ValueError, match=message) as error:
        teacher.distribution(rollouts, top_k=4)
    assert_one_line_naming(error, server.url)
    assert "position 2" in str(error.value)


def sglang_top_entry(results, change):
    change(results[0]["meta_info"]["input_top_logprobs"])
    return results


@pytest.mark.parametrize("change, message", [
    (lambda tops: tops.pop(), "input_top_logprobs is not a list of 4 entries"),
    (lambda tops: tops[2].pop(), "3 top log-probs where 4 were asked for"),
    (lambda tops: tops[2].reverse(), "not in decreasing order"),
    (lambda tops: tops[2][1].__setitem__(1, tops[2][0][1]), "repeat"),
    (lambda tops: tops[2][1].__setitem__(0, float("nan")), "a log-prob must be a finite number <= 0"),
    (lambda tops: tops[2].__setitem__(0, 7), "are not \\[logprob, token_id, text\\]"),
])
def test_sglang_malformed_top_k(server, change, message):
    teacher = get_teacher(server.url, api="sglang", model="teacher", **FAST)
    server.mutate = lambda results: sglang_top_entry(results, change)
    with pytest.raises(ValueError, match=message) as error:
        teacher.distribution(from_sequences([[4, 5, 90, 7]], [1]), top_k=4)
    assert_one_line_naming(error, server.url)
