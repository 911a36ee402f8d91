#!/usr/bin/env python3
"""Builds the tiny decoder-only test language model, its tokenizer and reference outputs.

Everything is written beside this script (models/lm/):

  tokenizer.json         byte-level BPE, 1024 tokens, trained on corpus.txt
  tokenizer_config.json  ChatML chat template and special-token names
  config.json            model hyper-parameters (Hugging Face-like)
  model.onnx             pre-norm GPT trained here (JAX, CPU, ~5 minutes) on chats under
                         the worker's default system prompt and on corpus.txt, with the
                         same interface as an Optimum ``text-generation-with-past``
                         export (KV cache)
  reference.json         greedy decoding computed by an independent numpy float32
                         implementation (full recompute each step, no KV cache)

Then check_model.py runs model.onnx with onnxruntime (KV cache, and a left-padded
batch) and fails loudly if anything differs from reference.json.

All randomness comes from fixed seeds, so the outputs are byte-identical across runs
on the same machine (another CPU may round the training's sums differently).

Usage:  python3 models/lm/make_model.py [--write-corpus] [--no-check]
        (packages: requirements-train.txt)

``--write-corpus`` regenerates corpus.txt from the phrase lists below first (the
committed corpus.txt is what they produce).
"""

import argparse
import hashlib
import json
import os
import random
import sys

# Single-threaded tokenizer training: no scheduling-dependent behaviour.
os.environ["TOKENIZERS_PARALLELISM"] = "false"
os.environ["RAYON_NUM_THREADS"] = "1"

import numpy as np  # noqa: E402

HERE = os.path.dirname(os.path.abspath(__file__))

CORPUS_SEED = 20261201
WEIGHT_SEED = 20261203

SPECIAL_TOKENS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]

CONFIG = {
    "model_type": "tiny-decoder",
    "vocab_size": 1024,
    "hidden_size": 64,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "head_dim": 16,
    "intermediate_size": 256,
    "max_position_embeddings": 256,
    "layer_norm_epsilon": 1e-5,
    "hidden_act": "gelu_tanh",
    "tie_word_embeddings": True,
    "eos_token_id": [2, 0],
    "pad_token_id": 0,
    "bos_token_id": None,
}

CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>' + '\\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)

TOKENIZER_CONFIG = {
    "chat_template": CHAT_TEMPLATE,
    "eos_token": "<|im_end|>",
    "pad_token": "<|endoftext|>",
    "bos_token": None,
}

MAX_NEW_TOKENS = 40
MIN_GREEDY_GAP = 0.02

# batch-worker's DEFAULT_SYSTEM_PROMPT (batch-worker/src/generate.rs; a test keeps the two
# equal): the model learns to answer under the prompt the worker renders by default.
WORKER_SYSTEM_PROMPT = (
    "너는 아동급식카드로 식사하는 어린이에게 근처 식당을 추천하는 친절한 도우미야. "
    "어린이가 이해하기 쉬운 말로 짧고 안전하게 답해. 사용자가 영어로 말하면 영어로 답해."
)

# Initial token-embedding std (tied output weights: initial logits have std ~0.8).
EMB_STD = 0.1
MASK_VALUE = np.float32(-1e9)


def render_chat(messages, add_generation_prompt=True):
    """Python rendering of CHAT_TEMPLATE (identical output)."""
    out = "".join(
        "<|im_start|>" + m["role"] + "\n" + m["content"] + "<|im_end|>" + "\n" for m in messages
    )
    if add_generation_prompt:
        out += "<|im_start|>assistant\n"
    return out


def worker_chat(user):
    """`user` as a chat under the worker's default system prompt, ready for the reply."""
    return render_chat([{"role": "system", "content": WORKER_SYSTEM_PROMPT}, {"role": "user", "content": user}])


# Reference prompts: plain Korean, plain English, and two rendered chats.
PROMPTS = [
    "배고파요. 오늘 점심으로 뭐 먹을까요?",
    "급식카드로 김밥을 살 수 있어요?",
    "Hello! What should I eat for lunch today?",
    "Can I use my meal card at this restaurant?",
    worker_chat("근처에 짜장면 맛있는 집 알려줘."),
    worker_chat("I want something warm. What do you recommend?"),
]


# ---------------------------------------------------------------------------
# Corpus
# ---------------------------------------------------------------------------

FOODS = [
    ("김밥", "gimbap"),
    ("참치김밥", "tuna gimbap"),
    ("짜장면", "jajangmyeon"),
    ("짬뽕", "jjamppong"),
    ("탕수육", "sweet and sour pork"),
    ("돈까스", "pork cutlet"),
    ("치즈돈까스", "cheese cutlet"),
    ("떡볶이", "tteokbokki"),
    ("순대", "sundae"),
    ("튀김", "fried snacks"),
    ("라면", "ramyeon"),
    ("국밥", "gukbap"),
    ("순대국밥", "sundae gukbap"),
    ("비빔밥", "bibimbap"),
    ("칼국수", "kalguksu"),
    ("우동", "udon"),
    ("제육덮밥", "spicy pork rice bowl"),
    ("김치찌개", "kimchi stew"),
    ("된장찌개", "soybean paste stew"),
    ("냉면", "cold noodles"),
    ("만두", "dumplings"),
    ("볶음밥", "fried rice"),
    ("오므라이스", "omelet rice"),
    ("카레라이스", "curry rice"),
    ("쫄면", "chewy spicy noodles"),
]

# (Korean name, English name, kind, foods served)
PLACES = [
    ("행복분식", "Happy Snack Bar", "분식집", ["김밥", "떡볶이", "순대", "튀김", "라면", "쫄면"]),
    ("해님김밥", "Sunny Gimbap", "김밥집", ["김밥", "참치김밥", "라면", "오므라이스", "볶음밥"]),
    ("만리장성", "Great Wall", "중국집", ["짜장면", "짬뽕", "탕수육", "볶음밥", "만두"]),
    ("별빛돈까스", "Starlight Cutlet", "돈까스집", ["돈까스", "치즈돈까스", "우동", "카레라이스"]),
    ("할머니국밥", "Grandma's Gukbap", "국밥집", ["국밥", "순대국밥", "김치찌개", "된장찌개"]),
    ("초록식당", "Green Table", "한식당", ["비빔밥", "제육덮밥", "김치찌개", "된장찌개"]),
    ("동네칼국수", "Town Noodle House", "칼국수집", ["칼국수", "만두", "냉면"]),
    ("꿈나무분식", "Dream Tree Snacks", "분식집", ["떡볶이", "김밥", "쫄면", "라면", "만두"]),
]

HANDWRITTEN = """\
안녕하세요! 저는 급식카드로 밥을 먹을 수 있는 식당을 찾아 주는 도우미예요.
안녕! 오늘 뭐 먹고 싶어?
반가워요. 배고프면 언제든지 물어보세요.
좋은 아침이에요! 아침은 먹었어요?
점심시간이네요. 맛있는 곳을 같이 찾아볼까요?
저녁 메뉴가 고민되면 말해 주세요.
어떤 음식을 좋아해요? 면, 밥, 분식 중에 골라 보세요.
매운 음식을 잘 먹어요? 안 매운 메뉴도 많아요.
아동급식카드는 아이들이 끼니를 거르지 않도록 도와주는 카드예요.
급식카드는 가맹점으로 등록된 식당에서 쓸 수 있어요.
가게 문이나 계산대에 급식카드 가맹점 스티커가 붙어 있는지 확인해 보세요.
잘 모르겠으면 계산하기 전에 "급식카드 되나요?" 하고 물어보면 돼요.
물어보는 건 부끄러운 일이 아니에요. 당당하게 물어봐도 괜찮아요.
하루에 쓸 수 있는 금액은 지역마다 달라요.
정확한 한 끼 금액은 주민센터나 카드 안내문에서 확인해 주세요.
카드 잔액은 카드사 안내 번호나 앱에서 확인할 수 있어요.
카드를 잃어버렸으면 바로 주민센터에 알려 주세요.
급식카드로 술이나 담배는 살 수 없어요.
과자만 사는 것보다 밥이 되는 메뉴를 고르면 더 든든해요.
편의점보다 식당에서 따뜻한 밥을 먹으면 더 좋아요.
채소도 같이 먹으면 몸이 튼튼해져요.
알레르기가 있으면 주문할 때 꼭 말씀드리세요.
땅콩 알레르기가 있으면 소스에 땅콩이 들어갔는지 물어보세요.
뜨거운 국물은 천천히 식혀서 드세요.
물을 충분히 마시는 것도 잊지 마세요.
오늘도 맛있게 먹어요!
맛있게 먹고 힘내요!
천천히 꼭꼭 씹어 먹어요.
다 먹고 나면 "잘 먹었습니다" 하고 인사해요.
식당 사장님께 고맙다고 말하면 모두 기분이 좋아져요.
혼자 먹어도 괜찮아요. 편하게 드세요.
친구랑 같이 가도 각자 카드로 계산할 수 있어요.
혹시 기다리는 줄이 길면 조금 있다가 다시 가 보세요.
비 오는 날에는 가까운 식당이 좋아요.
더운 날에는 시원한 냉면이나 쫄면 어때요?
추운 날에는 따뜻한 국밥이나 칼국수가 최고예요.
시험 기간에는 든든한 밥 메뉴를 추천해요.
배가 많이 고프면 곱빼기를 주문해도 되는지 물어보세요.
가격표를 보고 카드 금액 안에서 메뉴를 골라 보세요.
금액이 조금 넘으면 나머지는 다른 방법으로 내야 할 수도 있어요.
영업시간은 가게마다 달라요. 가기 전에 확인해 보세요.
일요일에 쉬는 가게도 있어요.
주말에도 여는 식당을 찾아 드릴까요?
집에서 가까운 식당을 알려 주면 더 정확하게 추천할 수 있어요.
학교 이름이나 동네 이름을 알려 주세요.
지도 앱에서 가게 위치를 확인할 수 있어요.
길을 건널 때는 꼭 횡단보도를 이용하세요.
늦은 밤에는 혼자 멀리 가지 말고 가까운 곳에서 먹어요.
다른 궁금한 점이 있으면 또 물어보세요.
도움이 되었다니 기뻐요!
천만에요. 언제든지 불러 주세요.
미안해요, 그 식당은 잘 모르겠어요.
그 가게가 급식카드를 받는지는 가게에 직접 물어보는 게 가장 정확해요.
좋은 질문이에요!
네, 알겠어요. 조금만 기다려 주세요.
고마워요! 잘 먹을게요.
감사합니다. 안녕히 계세요.
잘 가요! 다음에 또 만나요.
오늘 점심으로 뭐 먹을까요?
급식카드로 김밥을 살 수 있어요?
근처에 짜장면 맛있는 집 알려줘.
돈까스 먹고 싶어요.
떡볶이 안 매운 곳 있어요?
국밥집에서 급식카드 돼요?
카드 잔액이 얼마인지 어떻게 알아요?
카드를 잃어버렸어요. 어떻게 해요?
혼자 식당에 가도 돼요?
분식집 추천해 줘.
밥이 먹고 싶어. 면 말고.
따뜻한 거 먹고 싶어요.
Hello! I help kids find restaurants where they can pay with their meal card.
Hi! What would you like to eat today?
Nice to meet you. Ask me anytime you are hungry.
Good morning! Did you have breakfast?
It's lunchtime. Shall we find a good place together?
Tell me if you can't decide what to have for dinner.
What kind of food do you like? Noodles, rice, or snacks?
Do you like spicy food? There are many mild dishes too.
The children's meal card helps kids never skip a meal.
You can use the meal card at restaurants that are registered as partner stores.
Look for a meal card sticker on the door or at the counter.
If you are not sure, just ask "Can I use my meal card here?" before you order.
It is okay to ask. There is nothing to be shy about.
The daily amount you can spend is different in each area.
Please check the exact amount per meal at the community center or on the card guide.
You can check your card balance with the card company's phone number or app.
If you lose your card, tell the community center right away.
A real meal keeps you full longer than only snacks.
A warm meal at a restaurant is better than convenience store snacks.
Eating vegetables too makes you strong and healthy.
If you have an allergy, please tell the staff when you order.
If you are allergic to peanuts, ask whether the sauce has peanuts in it.
Let hot soup cool down a little before you eat it.
Don't forget to drink enough water.
Enjoy your meal!
Eat well and have a great day!
Take your time and chew well.
When you finish, say thank you to the owner.
It is fine to eat alone. Make yourself comfortable.
You and your friend can each pay with your own card.
If the line is long, you can come back a little later.
On rainy days, a restaurant close to home is a good choice.
On hot days, how about cold noodles?
On cold days, warm gukbap or kalguksu is the best.
During exams, I recommend a filling rice dish.
Check the price list and choose a dish within your card amount.
If the price is a little over the limit, you may need to pay the rest another way.
Opening hours are different for each shop. Please check before you go.
Some shops are closed on Sundays.
Do you want me to find a place that is open on weekends?
Tell me your school or neighborhood and I can recommend a place nearby.
You can check the location in a map app.
Always use the crosswalk when you cross the street.
Late at night, please eat somewhere close instead of going far alone.
If you have any other questions, just ask me.
I'm glad I could help!
You're welcome. Call me anytime.
Sorry, I don't know that restaurant.
The best way to know if a shop takes the meal card is to ask the shop.
That's a great question!
Okay, got it. Please wait a moment.
Thank you! I will enjoy my meal.
Thank you. Goodbye!
Bye! See you next time.
What should I eat for lunch today?
Can I use my meal card at this restaurant?
I want something warm. What do you recommend?
Where can I get jajangmyeon near here?
Is there a snack bar that takes the meal card?
How do I check my card balance?
I lost my card. What should I do?
"""

KO_TEMPLATES = [
    "{place}에서는 {food_eul} 먹을 수 있어요.",
    "{food_i} 먹고 싶으면 {place}에 가 보세요.",
    "{place_eun} 급식카드로 결제할 수 있는 {kind}이에요.",
    "오늘은 {food} 어때요?",
    "{food_eun} 배가 든든해지는 메뉴예요.",
    "{place_eun} 학교에서 걸어서 {n}분 거리에 있어요.",
    "{food} 한 그릇이면 점심으로 딱 좋아요.",
    "{place}의 {food_eun} 맵지 않아서 어린이도 먹기 좋아요.",
    "{place}에서 {food} 주세요. 급식카드로 계산할게요.",
    "{food_eul} 좋아하면 {place_eul} 추천해요.",
    "{place}의 {food_eun} 카드 금액 안에서 먹을 수 있을 거예요.",
    "점심으로 {food_eul} 먹고 싶어요. 어디가 좋아요?",
    "{place_eun} 사장님이 친절해서 인기가 많아요.",
    "{food}{wa} 물 한 잔이면 든든한 한 끼가 돼요.",
]

EN_TEMPLATES = [
    "You can eat {food_en} at {place_en}.",
    "If you want {food_en}, try {place_en}.",
    "{place_en} accepts the children's meal card.",
    "How about some {food_en} today?",
    "{food_en_cap} will keep you full.",
    "{place_en} is a {n}-minute walk from school.",
    "A plate of {food_en} is just right for lunch.",
    "{place_en} makes mild {food_en} that kids like.",
    "One order of {food_en}, please. I will pay with my meal card.",
    "If you like {food_en}, I recommend {place_en}.",
    "I want to eat {food_en} for lunch. Where should I go?",
    "The owner of {place_en} is very kind.",
]

QA_KO = [
    ("{place}에서 급식카드 돼요?", "네, {place_eun} 급식카드 가맹점이에요. 그래도 계산 전에 한 번 더 물어보세요."),
    ("{food} 파는 곳 알려줘.", "{place}에 가 보세요. {food_eun} 거기서 인기 메뉴예요."),
    ("{food} 매워요?", "{place}의 {food_eun} 많이 맵지 않아요. 걱정되면 덜 맵게 해 달라고 말해 보세요."),
    ("{kind} 추천해 줘.", "{place_eul} 추천해요. {food_eul} 먹어 보세요."),
]

QA_EN = [
    ("Can I use my meal card at {place_en}?", "Yes, {place_en} is a meal card partner store. Still, ask once more before you pay."),
    ("Where can I get {food_en}?", "Try {place_en}. People love the {food_en} there."),
    ("Will the {food_en} be too spicy for me?", "{place_en} makes mild {food_en}. You can also ask for less spice."),
]


def _jong(word):
    c = word[-1]
    if "가" <= c <= "힣":
        return (ord(c) - 0xAC00) % 28
    return 0


def _josa(word, with_final, without_final):
    return word + (with_final if _jong(word) else without_final)


def _food_en(ko):
    return dict(FOODS)[ko]


def _fill(template, place, food, rng):
    ko, en, kind, _ = place
    food_en = _food_en(food)
    return template.format(
        place=ko,
        place_en=en,
        kind=kind,
        food=food,
        food_en=food_en,
        food_en_cap=food_en[0].upper() + food_en[1:],
        food_eul=_josa(food, "을", "를"),
        food_i=_josa(food, "이", "가"),
        food_eun=_josa(food, "은", "는"),
        place_eun=_josa(ko, "은", "는"),
        place_eul=_josa(ko, "을", "를"),
        wa="과" if _jong(food) else "와",
        n=rng.choice([3, 5, 7, 10]),
    )


def corpus_lines():
    rng = random.Random(CORPUS_SEED)
    lines = [ln for ln in HANDWRITTEN.splitlines() if ln.strip()]
    generated = []
    for place in PLACES:
        for food in place[3]:
            for t in rng.sample(KO_TEMPLATES, 4):
                generated.append(_fill(t, place, food, rng))
            for t in rng.sample(EN_TEMPLATES, 2):
                generated.append(_fill(t, place, food, rng))
        food = rng.choice(place[3])
        for q, a in QA_KO:
            generated.append(_fill(q, place, food, rng))
            generated.append(_fill(a, place, food, rng))
        for q, a in QA_EN:
            generated.append(_fill(q, place, food, rng))
            generated.append(_fill(a, place, food, rng))
    rng.shuffle(generated)
    seen = set(lines)
    for g in generated:
        if g not in seen:
            seen.add(g)
            lines.append(g)
    return lines


# ---------------------------------------------------------------------------
# Tokenizer
# ---------------------------------------------------------------------------


def train_tokenizer(corpus_path):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    tok.decoder = decoders.ByteLevel()
    tok.post_processor = processors.ByteLevel(trim_offsets=False)
    trainer = trainers.BpeTrainer(
        vocab_size=CONFIG["vocab_size"],
        min_frequency=1,
        special_tokens=SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train([corpus_path], trainer)
    for i, t in enumerate(SPECIAL_TOKENS):
        assert tok.token_to_id(t) == i, (t, tok.token_to_id(t))
    assert tok.get_vocab_size() == CONFIG["vocab_size"], tok.get_vocab_size()
    return tok


# ---------------------------------------------------------------------------
# Weights
# ---------------------------------------------------------------------------


def init_weights():
    c = CONFIG
    d, ff, v, p = c["hidden_size"], c["intermediate_size"], c["vocab_size"], c["max_position_embeddings"]
    rng = np.random.default_rng(WEIGHT_SEED)

    def normal(shape, std):
        return (rng.standard_normal(shape) * std).astype(np.float32)

    def near_one(shape):
        return (1.0 + rng.standard_normal(shape) * 0.05).astype(np.float32)

    w = {
        "tok_emb": normal((v, d), EMB_STD),
        "pos_emb": normal((p, d), 0.2),
    }
    for i in range(c["num_hidden_layers"]):
        w[f"l{i}.ln1.g"] = near_one((d,))
        w[f"l{i}.ln1.b"] = normal((d,), 0.02)
        for n in ("q", "k", "v"):
            w[f"l{i}.w{n}"] = normal((d, d), d**-0.5)
            w[f"l{i}.b{n}"] = normal((d,), 0.02)
        w[f"l{i}.wo"] = normal((d, d), (2 * c["num_hidden_layers"] * d) ** -0.5)
        w[f"l{i}.bo"] = normal((d,), 0.02)
        w[f"l{i}.ln2.g"] = near_one((d,))
        w[f"l{i}.ln2.b"] = normal((d,), 0.02)
        w[f"l{i}.w1"] = normal((d, ff), d**-0.5)
        w[f"l{i}.b1"] = normal((ff,), 0.02)
        w[f"l{i}.w2"] = normal((ff, d), (2 * c["num_hidden_layers"] * ff) ** -0.5)
        w[f"l{i}.b2"] = normal((d,), 0.02)
    w["lnf.g"] = near_one((d,))
    w["lnf.b"] = normal((d,), 0.02)
    return w


# ---------------------------------------------------------------------------
# Chat data and training
# ---------------------------------------------------------------------------

TRAIN_SEED = 20261207
TRAIN_STEPS = 1500
TRAIN_BATCH = 32
LEARNING_RATE = 3e-3
RAW_PIECE = 128
RAW_PASSES = 4

# Requests for a food, in many phrasings: the model has to read the food off the request.
ASK_KO = [
    "근처에 {food} 맛있는 집 알려줘",
    "{food} 먹고 싶어",
    "{food} 파는 곳 알려줘",
    "급식카드로 {food} 먹을 수 있는 곳 있어",
    "{food}집 추천해 주세요",
    "오늘 점심은 {food} 먹을래. 어디가 좋아",
    "학교 근처에 급식카드 되는 {food}집 있어",
    "{food} 어디서 먹을 수 있어",
    "{food} 먹을래",
    "{food} 맛있는 곳",
    "근처에서 {food}집 찾아줘",
]
# A request is a prefix, a phrasing and an ending, drawn at random ASKS_PER_FOOD times per
# food.
ASK_PREFIX_KO = ["", "", "안녕! ", "혹시 ", "저기요, ", "음 "]
ASK_SUFFIX_KO = ["", ".", "?", "!", " ㅎㅎ"]
ASKS_PER_FOOD = 24

# Replies to a request restate its food first, then name the first place that serves it:
# the model learns to copy the food and to follow a food with its place.
ANSWER_KO = [
    "{food_i} 먹고 싶으면 {place}에 가 보세요. {place_eun} 급식카드 가맹점이에요.",
    "{food_eun} {place}에 가 보세요. 거기서 인기 메뉴예요. 급식카드로 계산할 수 있어요.",
]

ASK_EN = [
    "Where can I get {food_en}?",
    "I want {food_en}.",
    "Is there a {food_en} place near school that takes the meal card?",
    "Recommend a place for {food_en}, please.",
]

ANSWER_EN = [
    "For {food_en}, try {place_en}. People love it there.",
    "If you want {food_en}, try {place_en}. It accepts the children's meal card.",
]

# Other (user message, reply) templates, filled with a place and one of its foods: the
# corpus' questions (all but its food request, which ASK_* cover) and a few more.
CHAT_OTHER = [
    QA_KO[2],  # {food} 매워요?
    QA_KO[0],  # {place}에서 급식카드 돼요?
    QA_KO[3],  # {kind} 추천해 줘.
    ("점심 뭐 먹지?", "오늘은 {food} 어때요? {place}에서 급식카드로 먹을 수 있어요."),
    ("배고파. 뭐 먹을까?", "{place}의 {food} 어때요? {food_eun} 배가 든든해지는 메뉴예요."),
    QA_EN[0],  # Can I use my meal card at {place_en}?
    QA_EN[2],  # Will the {food_en} be too spicy for me?
    ("What should I eat for lunch today?", "How about some {food_en} today? You can pay with your meal card at {place_en}."),
    ("I'm hungry. Any ideas?", "{food_en_cap} at {place_en} will keep you full."),
]

# Questions whose answers name no place.
CHAT_FIXED = [
    ("안녕", "안녕하세요! 저는 급식카드로 밥을 먹을 수 있는 식당을 찾아 주는 도우미예요. 오늘 뭐 먹고 싶어요?"),
    ("카드 잔액이 얼마인지 어떻게 알아요?", "카드 잔액은 카드사 안내 번호나 앱에서 확인할 수 있어요."),
    ("카드를 잃어버렸어요. 어떻게 해요?", "카드를 잃어버렸으면 바로 주민센터에 알려 주세요."),
    ("한 끼에 얼마까지 쓸 수 있어?", "하루에 쓸 수 있는 금액은 지역마다 달라요. 정확한 한 끼 금액은 주민센터나 카드 안내문에서 확인해 주세요."),
    ("급식카드 어디서 써?", "급식카드는 가맹점으로 등록된 식당에서 쓸 수 있어요. 가게 문이나 계산대에 급식카드 가맹점 스티커가 붙어 있는지 확인해 보세요."),
    ("혼자 식당에 가도 돼요?", "혼자 먹어도 괜찮아요. 편하게 드세요."),
    ("땅콩 알레르기가 있어.", "알레르기가 있으면 주문할 때 꼭 말씀드리세요. 소스에 땅콩이 들어갔는지도 물어보세요."),
    ("따뜻한 거 먹고 싶어요.", "추운 날에는 따뜻한 국밥이나 칼국수가 최고예요. 할머니국밥이나 동네칼국수에 가 보세요."),
    ("Hello!", "Hello! I help kids find restaurants where they can pay with their meal card. What would you like to eat?"),
    ("How do I check my card balance?", "You can check your card balance with the card company's phone number or app."),
    ("I lost my card. What should I do?", "If you lose your card, tell the community center right away."),
    ("I want something warm. What do you recommend?", "On cold days, warm gukbap or kalguksu is the best. Try Grandma's Gukbap or Town Noodle House."),
]


def chat_pairs():
    """(user message, reply) pairs: requests for each food in random phrasings, answered with
    the first place that serves it, and every other template with every place and each of
    its foods."""
    rng = random.Random(TRAIN_SEED)
    pairs = list(CHAT_FIXED) * 8
    for food, _ in FOODS:
        place = next(p for p in PLACES if food in p[3])
        for _ in range(ASKS_PER_FOOD):
            prefix = rng.choice(ASK_PREFIX_KO)
            q = prefix + rng.choice(ASK_KO) + rng.choice(ASK_SUFFIX_KO)
            a = ("안녕하세요! " if prefix == "안녕! " else "") + rng.choice(ANSWER_KO)
            pairs.append((_fill(q, place, food, rng), _fill(a, place, food, rng)))
        for q in ASK_EN:
            pairs.append((_fill(q, place, food, rng), _fill(rng.choice(ANSWER_EN), place, food, rng)))
    for place in PLACES:
        for food in place[3]:
            for q, a in CHAT_OTHER:
                pairs.append((_fill(q, place, food, rng), _fill(a, place, food, rng)))
    return pairs


def training_examples(tok, corpus_path):
    """Token ids and loss masks: chats under the worker's system prompt (loss on the reply and
    its `<|im_end|>` only), and the corpus as running text, its lines in shuffled order packed
    into pieces of up to RAW_PIECE tokens (for `--prompt-format raw`, which writes on)."""
    examples = []
    for user, reply in chat_pairs():
        p = tok.encode(worker_chat(user), add_special_tokens=False).ids
        r = tok.encode(reply + "<|im_end|>", add_special_tokens=False).ids
        examples.append((p + r, [0] * len(p) + [1] * len(r)))
    with open(corpus_path, encoding="utf-8") as f:
        lines = [tok.encode(ln.strip() + "\n", add_special_tokens=False).ids for ln in f if ln.strip()]
    rng = random.Random(TRAIN_SEED)
    for _ in range(RAW_PASSES):
        rng.shuffle(lines)
        piece = []
        for ids in lines:
            if piece and len(piece) + len(ids) > RAW_PIECE:
                examples.append((piece, [1] * len(piece)))
                piece = []
            piece = piece + ids
        examples.append((piece, [1] * len(piece)))
    return examples


def jax_forward(w, ids):
    """np_forward in jax, batched: logits [B, S, V] for ids [B, S] (positions 0..S-1)."""
    import jax
    import jax.numpy as jnp

    c = CONFIG
    h_n, h_d, eps = c["num_attention_heads"], c["head_dim"], c["layer_norm_epsilon"]
    b, s = ids.shape

    def ln(x, g, bias):
        m = x.mean(-1, keepdims=True)
        v = ((x - m) ** 2).mean(-1, keepdims=True)
        return (x - m) / jnp.sqrt(v + eps) * g + bias

    def heads(x):
        return x.reshape(b, s, h_n, h_d).transpose(0, 2, 1, 3)

    x = w["tok_emb"][ids] + w["pos_emb"][:s]
    causal = jnp.tril(jnp.ones((s, s), dtype=bool))
    for i in range(c["num_hidden_layers"]):
        p = f"l{i}"
        h = ln(x, w[f"{p}.ln1.g"], w[f"{p}.ln1.b"])
        q, k, v = (heads(h @ w[f"{p}.w{n}"] + w[f"{p}.b{n}"]) for n in "qkv")
        scores = jnp.where(causal, q @ k.transpose(0, 1, 3, 2) / np.sqrt(h_d), MASK_VALUE)
        probs = jax.nn.softmax(scores, axis=-1)
        ctx = (probs @ v).transpose(0, 2, 1, 3).reshape(b, s, h_n * h_d)
        x = x + ctx @ w[f"{p}.wo"] + w[f"{p}.bo"]
        h = ln(x, w[f"{p}.ln2.g"], w[f"{p}.ln2.b"])
        m = h @ w[f"{p}.w1"] + w[f"{p}.b1"]
        m = 0.5 * m * (1 + jnp.tanh(np.sqrt(2 / np.pi) * (m + 0.044715 * m**3)))
        x = x + m @ w[f"{p}.w2"] + w[f"{p}.b2"]
    return ln(x, w["lnf.g"], w["lnf.b"]) @ w["tok_emb"].T


def train(w, examples):
    """Adam with warm-up and cosine decay on the masked next-token loss, fixed seeds, full
    float32 on the CPU. Returns the trained weights as numpy float32."""
    import jax
    import jax.numpy as jnp

    jax.config.update("jax_platforms", "cpu")
    width = max(len(ids) for ids, _ in examples)
    assert width <= CONFIG["max_position_embeddings"], width
    ids = np.zeros((len(examples), width), dtype=np.int32)
    mask = np.zeros((len(examples), width), dtype=np.float32)
    for row, (e, m) in enumerate(examples):
        ids[row, : len(e)] = e
        mask[row, : len(m)] = m

    def loss_fn(params, x, m):
        logits = jax_forward(params, x[:, :-1])
        logp = jax.nn.log_softmax(logits, axis=-1)
        nll = -jnp.take_along_axis(logp, x[:, 1:, None], axis=-1)[..., 0]
        return (nll * m[:, 1:]).sum() / m[:, 1:].sum()

    def lr(step):
        warm = jnp.minimum(1.0, (step + 1) / 100)
        return LEARNING_RATE * warm * 0.5 * (1 + jnp.cos(jnp.pi * step / TRAIN_STEPS))

    @jax.jit
    def update(params, opt, step, x, m):
        loss, grads = jax.value_and_grad(loss_fn)(params, x, m)
        mu, nu = opt
        mu = jax.tree.map(lambda a, g: 0.9 * a + 0.1 * g, mu, grads)
        nu = jax.tree.map(lambda a, g: 0.999 * a + 0.001 * g * g, nu, grads)
        t = step + 1
        scale = lr(step) * jnp.sqrt(1 - 0.999**t) / (1 - 0.9**t)
        params = jax.tree.map(lambda p, a, b: p - scale * a / (jnp.sqrt(b) + 1e-8), params, mu, nu)
        return params, (mu, nu), loss

    params = {k: jnp.asarray(v) for k, v in w.items()}
    zeros = jax.tree.map(jnp.zeros_like, params)
    opt = (zeros, zeros)
    rng = np.random.default_rng(TRAIN_SEED)
    for step in range(TRAIN_STEPS):
        rows = rng.choice(len(examples), TRAIN_BATCH, replace=False)
        # Only as wide as the batch's longest example, rounded up to limit recompilation.
        used = min(width, -(-(int(mask[rows].nonzero()[1].max()) + 1) // 32) * 32)
        params, opt, loss = update(params, opt, step, ids[rows, :used], mask[rows, :used])
        if step % 100 == 0 or step == TRAIN_STEPS - 1:
            print(f"step {step:5d}  loss {float(loss):.3f}", flush=True)
    return {k: np.asarray(v, dtype=np.float32) for k, v in params.items()}


def check_training_forward(w, ids):
    """The forward pass trained is the one the reference and the ONNX graph compute."""
    a = np_forward(w, ids)
    b = np.asarray(jax_forward(w, np.asarray([ids])))[0]
    diff = float(np.abs(a - b).max())
    if not diff < 1e-3:
        sys.exit(f"FAIL: the training's forward pass differs from np_forward by {diff}")


# ---------------------------------------------------------------------------
# Independent numpy reference (full recompute, no KV cache)
# ---------------------------------------------------------------------------


def np_layer_norm(x, g, b, eps):
    mean = x.mean(axis=-1, keepdims=True, dtype=np.float32)
    xc = x - mean
    var = (xc * xc).mean(axis=-1, keepdims=True, dtype=np.float32)
    return (xc / np.sqrt(var + np.float32(eps)) * g + b).astype(np.float32)


def np_gelu_tanh(x):
    k = np.float32(np.sqrt(2.0 / np.pi))
    return (np.float32(0.5) * x * (np.float32(1.0) + np.tanh(k * (x + np.float32(0.044715) * x * x * x)))).astype(
        np.float32
    )


def np_forward(w, ids):
    """Logits [S, V] for one unpadded sequence of token ids (positions 0..S-1)."""
    c = CONFIG
    h_n, h_d, eps = c["num_attention_heads"], c["head_dim"], np.float32(c["layer_norm_epsilon"])
    ids = np.asarray(ids, dtype=np.int64)
    s = ids.shape[0]
    x = (w["tok_emb"][ids] + w["pos_emb"][np.arange(s)]).astype(np.float32)
    causal = np.tril(np.ones((s, s), dtype=bool))
    scale = np.float32(1.0 / np.sqrt(h_d))
    for i in range(c["num_hidden_layers"]):
        h = np_layer_norm(x, w[f"l{i}.ln1.g"], w[f"l{i}.ln1.b"], eps)
        q = (h @ w[f"l{i}.wq"] + w[f"l{i}.bq"]).reshape(s, h_n, h_d).transpose(1, 0, 2)
        k = (h @ w[f"l{i}.wk"] + w[f"l{i}.bk"]).reshape(s, h_n, h_d).transpose(1, 0, 2)
        v = (h @ w[f"l{i}.wv"] + w[f"l{i}.bv"]).reshape(s, h_n, h_d).transpose(1, 0, 2)
        scores = (q @ k.transpose(0, 2, 1)) * scale
        scores = np.where(causal[None], scores, MASK_VALUE)
        scores = scores - scores.max(axis=-1, keepdims=True)
        e = np.exp(scores)
        probs = (e / e.sum(axis=-1, keepdims=True, dtype=np.float32)).astype(np.float32)
        ctx = (probs @ v).transpose(1, 0, 2).reshape(s, h_n * h_d)
        x = (x + ctx @ w[f"l{i}.wo"] + w[f"l{i}.bo"]).astype(np.float32)
        h = np_layer_norm(x, w[f"l{i}.ln2.g"], w[f"l{i}.ln2.b"], eps)
        m = np_gelu_tanh(h @ w[f"l{i}.w1"] + w[f"l{i}.b1"])
        x = (x + m @ w[f"l{i}.w2"] + w[f"l{i}.b2"]).astype(np.float32)
    x = np_layer_norm(x, w["lnf.g"], w["lnf.b"], eps)
    return (x @ w["tok_emb"].T).astype(np.float32)


def top2_gap(logits):
    top = np.sort(logits)[-2:]
    return float(top[1] - top[0])


def f32_list(a):
    # Shortest decimal that round-trips float32: compact and stable JSON.
    return [float(str(np.float32(x))) for x in np.asarray(a, dtype=np.float32).ravel()]


def greedy_reference(w, tok):
    eos = set(CONFIG["eos_token_id"])
    items = []
    all_logits = []
    for text in PROMPTS:
        ids = tok.encode(text, add_special_tokens=False).ids
        seq = list(ids)
        gen, gaps = [], []
        first = last = None
        for _ in range(MAX_NEW_TOKENS):
            logits = np_forward(w, seq)[-1]
            all_logits.append(logits)
            if first is None:
                first = logits
            last = logits
            nxt = int(np.argmax(logits))
            gaps.append(top2_gap(logits))
            gen.append(nxt)
            seq.append(nxt)
            if nxt in eos:
                break
        items.append(
            {
                "text": text,
                "input_ids": ids,
                "generated_ids": gen,
                "greedy_gaps": [float(str(np.float32(g))) for g in gaps],
                "first_step_logits": f32_list(first),
                "last_step_logits": f32_list(last),
            }
        )
    return items, np.stack(all_logits)


# ---------------------------------------------------------------------------
# ONNX graph
# ---------------------------------------------------------------------------


def interface(n_layers, kv_heads, head_dim, vocab):
    """The graph inputs and outputs of Optimum's ``text-generation-with-past`` layout."""
    from onnx import TensorProto, helper

    F, I64 = TensorProto.FLOAT, TensorProto.INT64
    inputs = [
        helper.make_tensor_value_info("input_ids", I64, ["batch_size", "sequence_length"]),
        helper.make_tensor_value_info("attention_mask", I64, ["batch_size", "total_sequence_length"]),
        helper.make_tensor_value_info("position_ids", I64, ["batch_size", "sequence_length"]),
    ]
    outputs = [helper.make_tensor_value_info("logits", F, ["batch_size", "sequence_length", vocab])]
    for i in range(n_layers):
        for kind in ("key", "value"):
            inputs.append(
                helper.make_tensor_value_info(
                    f"past_key_values.{i}.{kind}", F, ["batch_size", kv_heads, "past_sequence_length", head_dim]
                )
            )
            outputs.append(
                helper.make_tensor_value_info(
                    f"present.{i}.{kind}", F, ["batch_size", kv_heads, "total_sequence_length", head_dim]
                )
            )
    return inputs, outputs


def embed_and_mask(node):
    """Token plus learned position embeddings (`x_emb`), and the attention mask `allowed`
    [B, 1, S, T]: query j (absolute position past_len + j) may attend key t iff
    t <= past_len + j and attention_mask[b, t] == 1. `node(op, ins, outs, **attrs)` adds a
    node; the initializers tok_emb, pos_emb, c_i64_0/1 and c_axes_0/1/12 must exist."""
    from onnx import TensorProto

    node("Gather", ["tok_emb", "input_ids"], ["tok_x"], axis=0)
    node("Gather", ["pos_emb", "position_ids"], ["pos_x"], axis=0)
    x = node("Add", ["tok_x", "pos_x"], ["x_emb"])
    node("Shape", ["input_ids"], ["ids_shape"])
    node("Gather", ["ids_shape", "c_i64_1"], ["seq_len"], axis=0)
    node("Shape", ["attention_mask"], ["mask_shape"])
    node("Gather", ["mask_shape", "c_i64_1"], ["total_len"], axis=0)
    node("Sub", ["total_len", "seq_len"], ["past_len"])
    node("Range", ["past_len", "total_len", "c_i64_1"], ["q_pos"])
    node("Range", ["c_i64_0", "total_len", "c_i64_1"], ["k_pos"])
    node("Unsqueeze", ["q_pos", "c_axes_1"], ["q_pos_col"])  # [S, 1]
    node("Unsqueeze", ["k_pos", "c_axes_0"], ["k_pos_row"])  # [1, T]
    node("LessOrEqual", ["k_pos_row", "q_pos_col"], ["causal"])  # [S, T]
    node("Cast", ["attention_mask"], ["mask_bool"], to=TensorProto.BOOL)  # [B, T]
    node("Unsqueeze", ["mask_bool", "c_axes_12"], ["mask_b11t"])  # [B, 1, 1, T]
    node("And", ["causal", "mask_b11t"], ["allowed"])  # [B, 1, S, T]
    return x


def build_onnx(w):
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    c = CONFIG
    n_layers, h_n, h_d = c["num_hidden_layers"], c["num_attention_heads"], c["head_dim"]
    d, v = c["hidden_size"], c["vocab_size"]
    eps = c["layer_norm_epsilon"]

    nodes, inits = [], []

    def init(name, arr):
        inits.append(numpy_helper.from_array(np.ascontiguousarray(arr), name))
        return name

    def node(op, ins, outs, **attrs):
        nodes.append(helper.make_node(op, ins, outs, **attrs))
        return outs[0]

    for name in sorted(w):
        init(name, w[name])
    init("c_i64_0", np.array(0, dtype=np.int64))
    init("c_i64_1", np.array(1, dtype=np.int64))
    init("c_axes_0", np.array([0], dtype=np.int64))
    init("c_axes_1", np.array([1], dtype=np.int64))
    init("c_axes_12", np.array([1, 2], dtype=np.int64))
    init("c_heads_shape", np.array([0, 0, h_n, h_d], dtype=np.int64))
    init("c_merge_shape", np.array([0, 0, h_n * h_d], dtype=np.int64))
    init("c_scale", np.array(1.0 / np.sqrt(h_d), dtype=np.float32))
    init("c_mask_value", np.array(MASK_VALUE, dtype=np.float32))
    init("c_half", np.array(0.5, dtype=np.float32))
    init("c_one", np.array(1.0, dtype=np.float32))
    init("c_gelu_k", np.array(np.sqrt(2.0 / np.pi), dtype=np.float32))
    init("c_gelu_c", np.array(0.044715, dtype=np.float32))

    x = embed_and_mask(node)

    def heads(src, tag):
        node("Reshape", [src, "c_heads_shape"], [f"{tag}_bshd"])
        return node("Transpose", [f"{tag}_bshd"], [f"{tag}_bhsd"], perm=[0, 2, 1, 3])

    for i in range(n_layers):
        p = f"l{i}"
        h = node(
            "LayerNormalization", [x, f"{p}.ln1.g", f"{p}.ln1.b"], [f"{p}_ln1"], axis=-1, epsilon=eps
        )
        proj = {}
        for n in ("q", "k", "v"):
            node("MatMul", [h, f"{p}.w{n}"], [f"{p}_{n}_mm"])
            node("Add", [f"{p}_{n}_mm", f"{p}.b{n}"], [f"{p}_{n}"])
            proj[n] = heads(f"{p}_{n}", f"{p}_{n}")
        k_all = node("Concat", [f"past_key_values.{i}.key", proj["k"]], [f"present.{i}.key"], axis=2)
        v_all = node("Concat", [f"past_key_values.{i}.value", proj["v"]], [f"present.{i}.value"], axis=2)
        node("Transpose", [k_all], [f"{p}_kT"], perm=[0, 1, 3, 2])
        node("MatMul", [proj["q"], f"{p}_kT"], [f"{p}_qk"])
        node("Mul", [f"{p}_qk", "c_scale"], [f"{p}_scores"])
        node("Where", ["allowed", f"{p}_scores", "c_mask_value"], [f"{p}_masked"])
        node("Softmax", [f"{p}_masked"], [f"{p}_probs"], axis=-1)
        node("MatMul", [f"{p}_probs", v_all], [f"{p}_ctx_bhsd"])
        node("Transpose", [f"{p}_ctx_bhsd"], [f"{p}_ctx_bshd"], perm=[0, 2, 1, 3])
        node("Reshape", [f"{p}_ctx_bshd", "c_merge_shape"], [f"{p}_ctx"])
        node("MatMul", [f"{p}_ctx", f"{p}.wo"], [f"{p}_o_mm"])
        node("Add", [f"{p}_o_mm", f"{p}.bo"], [f"{p}_o"])
        x = node("Add", [x, f"{p}_o"], [f"{p}_x_attn"])

        h = node(
            "LayerNormalization", [x, f"{p}.ln2.g", f"{p}.ln2.b"], [f"{p}_ln2"], axis=-1, epsilon=eps
        )
        node("MatMul", [h, f"{p}.w1"], [f"{p}_fc1_mm"])
        m = node("Add", [f"{p}_fc1_mm", f"{p}.b1"], [f"{p}_fc1"])
        # GELU, tanh approximation: 0.5 * m * (1 + tanh(k * (m + c * m^3)))
        node("Mul", [m, m], [f"{p}_m2"])
        node("Mul", [f"{p}_m2", m], [f"{p}_m3"])
        node("Mul", [f"{p}_m3", "c_gelu_c"], [f"{p}_cm3"])
        node("Add", [m, f"{p}_cm3"], [f"{p}_inner"])
        node("Mul", [f"{p}_inner", "c_gelu_k"], [f"{p}_kinner"])
        node("Tanh", [f"{p}_kinner"], [f"{p}_tanh"])
        node("Add", [f"{p}_tanh", "c_one"], [f"{p}_1tanh"])
        node("Mul", [m, "c_half"], [f"{p}_halfm"])
        node("Mul", [f"{p}_halfm", f"{p}_1tanh"], [f"{p}_gelu"])
        node("MatMul", [f"{p}_gelu", f"{p}.w2"], [f"{p}_fc2_mm"])
        node("Add", [f"{p}_fc2_mm", f"{p}.b2"], [f"{p}_fc2"])
        x = node("Add", [x, f"{p}_fc2"], [f"{p}_x_mlp"])

    node("LayerNormalization", [x, "lnf.g", "lnf.b"], ["x_final"], axis=-1, epsilon=eps)
    node("Transpose", ["tok_emb"], ["tok_emb_T"], perm=[1, 0])
    node("MatMul", ["x_final", "tok_emb_T"], ["logits"])

    inputs, outputs = interface(n_layers, h_n, h_d, v)

    graph = helper.make_graph(nodes, "tiny_decoder", inputs, outputs, initializer=inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 9
    onnx.checker.check_model(model, full_check=True)
    return model


# ---------------------------------------------------------------------------


def sha256(path):
    with open(path, "rb") as f:
        return hashlib.sha256(f.read()).hexdigest()


def write_json(path, obj):
    with open(path, "w", encoding="utf-8") as f:
        json.dump(obj, f, ensure_ascii=False, indent=2)
        f.write("\n")


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--write-corpus", action="store_true", help="regenerate corpus.txt first")
    ap.add_argument("--no-check", action="store_true", help="skip the onnxruntime verification")
    args = ap.parse_args()

    corpus_path = os.path.join(HERE, "corpus.txt")
    if args.write_corpus:
        with open(corpus_path, "w", encoding="utf-8") as f:
            f.write("\n".join(corpus_lines()) + "\n")

    tok = train_tokenizer(corpus_path)
    tok_path = os.path.join(HERE, "tokenizer.json")
    tok.save(tok_path, pretty=True)
    # Korean and ChatML must round-trip through the saved file.
    from tokenizers import Tokenizer

    tok = Tokenizer.from_file(tok_path)
    for text in PROMPTS:
        enc = tok.encode(text, add_special_tokens=False)
        assert tok.decode(enc.ids, skip_special_tokens=False) == text, text

    write_json(os.path.join(HERE, "tokenizer_config.json"), TOKENIZER_CONFIG)
    write_json(os.path.join(HERE, "config.json"), CONFIG)

    examples = training_examples(tok, corpus_path)
    w = train(init_weights(), examples)
    check_training_forward(w, examples[0][0])
    model = build_onnx(w)
    model_path = os.path.join(HERE, "model.onnx")
    with open(model_path, "wb") as f:
        f.write(model.SerializeToString(deterministic=True))

    items, all_logits = greedy_reference(w, tok)
    min_gap = min(g for it in items for g in it["greedy_gaps"])
    # The tests decode these prompts with the KV cache rounded to float16 too (up to ~0.008
    # off at these logits' magnitude) and still expect the same greedy tokens.
    if not min_gap > MIN_GREEDY_GAP:
        sys.exit(f"FAIL: smallest top-1/top-2 greedy gap is {min_gap}, need > {MIN_GREEDY_GAP}: pick other PROMPTS")
    reference = {
        "max_new_tokens": MAX_NEW_TOKENS,
        "eos_token_id": CONFIG["eos_token_id"],
        "min_greedy_gap": float(str(np.float32(min_gap))),
        "prompts": items,
    }
    write_json(os.path.join(HERE, "reference.json"), reference)

    print(f"vocab {tok.get_vocab_size()}, special ids " + ", ".join(f"{t}={tok.token_to_id(t)}" for t in SPECIAL_TOKENS))
    print(f"greedy-step logits: std {all_logits.std(axis=-1).mean():.3f} (mean over steps), min top-2 gap {min_gap:.4f}")
    for it in items:
        print(f"  prompt {len(it['input_ids']):3d} ids -> {it['generated_ids']}")
    for name in ("model.onnx", "tokenizer.json", "reference.json"):
        path = os.path.join(HERE, name)
        print(f"{name}: {os.path.getsize(path)} bytes, sha256 {sha256(path)}")

    if not args.no_check:
        sys.path.insert(0, HERE)
        import check_model

        check_model.main([HERE])


if __name__ == "__main__":
    main()
