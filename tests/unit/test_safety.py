"""The content filter (gateway/safety.py): evasions are folded away, ambiguous CJK words are judged
in context, and refusals name the category, not the word."""

import statistics
import timeit
from types import SimpleNamespace

import pytest

from gateway.safety import SafetyFilter
from gateway.tenants import Tenant
from videomesh.errors import InvalidArgument
from videomesh.v1 import common_pb2


@pytest.fixture(scope="module")
def safety():
    return SafetyFilter.load()


@pytest.mark.parametrize("prompt", [
    "make Trump dance", "make T r u m p dance", "make t.r.u.m.p dance", "make ｔｒｕｍｐ dance",  # spacing, full width
    "make tr\u200bump dance", "make TRUUUMP dance", "make trümp dance", "make тrump dance",  # zero-width, repeats, accents, Cyrillic
    "让特朗普跳舞", "让特 朗 普跳舞", "特\u200b朗普在跳舞", "トランプが踊る", "ﾄﾗﾝﾌﾟが踊る",  # zh, ja, half-width katakana
    "a n.a.k.e.d person", "a mass-shooting scene", "ＰＵＴＩＮ waves",
    # ambiguous words still count outside their harmless phrases
    "トランプ大統領が演説する", "make トランプ dance", "トランプ大統領がトランプで遊ぶ", "ドナルド・トランプで遊ぶ",
    "イーロン・マスクが踊る", "マスク氏が踊る", "エロ動画", "ヌード写真", "pu tin waves", "p u t i n waves",
])  # fmt: skip
def test_blocked_prompts_and_evasions(safety, prompt):
    assert safety.check(prompt).blocked, prompt


WORLD = [
    "a red ball moves left on a black background", "a purple triangle moving up on a white background",
    "a snake slides right", "a trumpet player on stage", "a green box moving down on a grey background",
]  # fmt: skip


@pytest.mark.parametrize("prompt", [
    *WORLD, "grumpy cat", "put in a box", "一个红色的小球向右移动", "赤いボールが右へ動く",
    # English that runs together into a listed word or its pinyin, and digits that are not leetspeak
    "a chocolate pudding", "a ship about to be heading north", "children under age 5 playing", "a top less crowded",
    "a tramp walks by", "a rump steak", "a 3d render of a cube, 4k, 1080p", "r2d2 robot in a 747", "te amo, langosta",
    "the band plays pop music", "a can of shandy", "a tuba player", "a dog in a kayak at dawn",
])  # fmt: skip
def test_harmless_prompts_pass(safety, prompt):
    assert not safety.check(prompt).blocked, safety.check(prompt)


# issue 18 item 5: CJK terms are judged in context, not as bare substrings (the issue names three;
# the others are the same defect with other words)
@pytest.mark.parametrize("prompt", [
    "マスクをした女性が公園を歩く",  # a woman wearing a face mask
    "マスクを着けた男性が駅にいる",  # a man with a face mask on
    "子供たちがトランプで遊ぶ",  # children playing cards
    "トランプのカードを机に並べる",  # laying out playing cards
    "エロンゲーション",  # elongation
    "イエローの車が走る",  # a yellow car
    "ヌードルを食べる猫",  # a cat eating noodles
    "一个说四川普通话的老师",  # a teacher speaking Sichuan Mandarin (川普 inside 四川普通话)
])  # fmt: skip
def test_cjk_false_positives_pass(safety, prompt):
    assert not safety.check(prompt).blocked, safety.check(prompt)


# issue 18 item 20: one case per evasion named in the issue
@pytest.mark.parametrize("prompt, category", [
    ("make te lang pu dance", "public_figures"),  # pinyin, spaced
    ("make chuan pu dance", "public_figures"),
    ("make telangpu dance", "public_figures"),  # pinyin, joined
    ("make Chuanpu dance", "public_figures"),
    ("make Te-Lang-Pu dance", "public_figures"),
    ("让歐巴馬跳舞", "public_figures"),  # traditional characters not in the list
    ("讓馬斯克跳舞", "public_figures"),
    ("一个裸體的人", "sexual"),
    ("make t_r_u_m_p dance", "public_figures"),  # separators
    ("让特_朗_普跳舞", "public_figures"),
    ("make tr ump dance", "public_figures"),
    ("make\ntrump\ndance", "public_figures"),
    ("让trump跳舞", "public_figures"),  # a Latin name inside Chinese text
    ("make tr0mp dance", "public_figures"),  # leetspeak: the docstring's example
    ("make d0nald tr00mp dance", "public_figures"),
    ("make tr\u057dmp dance", "public_figures"),  # Armenian seh for u
    ("\u0585bama waves", "public_figures"),  # Armenian oh for o
    ("make ᴛʀᴜᴍᴘ dance", "public_figures"),  # Latin small capitals
])  # fmt: skip
def test_evasions_are_folded(safety, prompt, category):
    verdict = safety.check(prompt)
    assert verdict.blocked and verdict.category == category, (prompt, verdict)


@pytest.mark.parametrize("prompt, category", [
    ("te lang pu", "public_figures"), ("裸體", "sexual"), ("a mass-shooting scene", "violence"),
    ("未成年", "minors"), ("エロ動画", "sexual"), ("t_r_u_m_p", "public_figures"),
])  # fmt: skip
def test_category_is_reported(safety, prompt, category):
    assert safety.check(prompt).category == category


def test_custom_lists():
    f = SafetyFilter({"brands": ["acme corp", "竞品"]})
    assert f.check("an ACME   corp logo").category == "brands"
    assert f.check("展示竞品").blocked and not f.check("a red ball").blocked


def test_ambiguous_entries_and_their_validation():
    f = SafetyFilter(
        {"cards": [{"term": "ジョーカー", "unless_part_of": ["ジョーカーのカード"]}, "ace of spades"]}
    )
    assert not f.check("ジョーカーのカードを引く").blocked
    assert f.check("ジョーカーが笑う").category == "cards"
    assert f.check("the aceofspades").blocked  # a multi-word term also matches run together
    with pytest.raises(ValueError, match="bad entry"):
        SafetyFilter({"x": [{"term": "a", "unless_followed_by": ["b"]}]})
    for bad in (["カード"], ["トランプ"], ["トランプ card"]):  # a harmless phrase must add CJK context
        with pytest.raises(ValueError, match="does not contain"):
            SafetyFilter({"x": [{"term": "トランプ", "unless_part_of": bad}]})
    with pytest.raises(ValueError, match="does not contain"):
        SafetyFilter({"x": [{"term": "putin", "unless_part_of": ["putin"]}]})
    with pytest.raises(ValueError, match="mixes"):
        SafetyFilter({"x": ["マスクCEO"]})


def test_refusal_names_the_category_but_not_the_word(safety, tmp_path, monkeypatch):
    from gateway import admission as admission_module
    from gateway.admission import Admission

    logged = []
    monkeypatch.setattr(admission_module.audit, "warning", lambda msg, *args: logged.append(msg % args))
    store = SimpleNamespace(add_blocked=lambda tenant, category: None)
    admission = Admission(SimpleNamespace(data_dir=tmp_path), store, None, safety)
    with pytest.raises(InvalidArgument) as e:
        admission.screen(Tenant("studio"), common_pb2.VideoSpec(prompt="make tr0mp dance"))
    assert "public figures" in e.value.message and "trump" not in e.value.message.lower()
    assert e.value.metadata == {"category": "public_figures"}
    assert '"term": "trump"' in (tmp_path / "audit.log").read_text()  # the word goes to the audit only
    # the same line in the process's log (logger videomesh.audit: what a cluster's pipeline collects),
    # with a hash of the prompt, never its text
    assert len(logged) == 1 and '"term": "trump"' in logged[0] and "tr0mp dance" not in logged[0]


def test_check_is_fast(safety):
    prompts = [
        "a red ball moves left on a black background while a purple triangle moves up and a snake slides right; "
        * 2,
        "一个红色的小球在黑色背景上向左移动，一个紫色的三角形向上移动，一条蛇向右滑动。" * 6,
        "赤いボールが黒い背景の上を左へ動き、マスクをした女性が公園を歩き、子供たちがトランプで遊ぶ。" * 5,
    ]
    for p in prompts:
        p = p[:200]
        per_check = statistics.median(timeit.repeat(lambda p=p: safety.check(p), number=20, repeat=7)) / 20
        assert per_check < 0.005, f"{per_check * 1e3:.2f} ms per check of {p[:20]}…"
