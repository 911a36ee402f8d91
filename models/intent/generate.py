#!/usr/bin/env python3
"""Deterministic training-data generator for the chatbot's tiny intent classifier.

Reads hand-written seed phrases from ``seeds/<intent>.txt`` (beside this script),
expands them with augmentations, builds compositional ``other`` examples, splits
everything into train/dev/test by group (so augmentations of one seed never
cross splits; each family of seeds has its shortest seed in train) and writes
``train.jsonl``, ``dev.jsonl``, ``test.jsonl`` and ``dev.folds`` (the calibration
fold of each dev line).

Seeds under ``seeds/added/`` were written after the splits were first drawn, in batches:
the files in ``seeds/added/`` itself, then each subfolder in name order.  Each batch goes
through the same steps on a random stream of its own and its lines come after the earlier
ones in each file, so a new batch (a new subfolder) moves no earlier line.  No generated
text shares its loose key with a line of ``challenge.jsonl``, the set kept apart for
checking the router.

Standard library only.  Output is byte-identical across runs: ``random.Random(20261127)``
(``--seed``) drives every random choice of the seeds in ``seeds/``, streams seeded with
``"20261127/added"`` and ``"20261127/added/<folder>"`` those of the batches, and every
iteration over a dict or set that could influence a choice is sorted first.

Usage:  python3 models/intent/generate.py [--out DIR]
"""

import argparse
import json
import os
import random
import sys
import unicodedata
import zlib
from collections import Counter, defaultdict

SEED = 20261127
TRIVIAL = ("greeting", "thanks", "goodbye", "help", "identity")
INTENTS = TRIVIAL + ("other",)
SPLITS = ("train", "dev", "test")
SPLIT_FRAC = {"train": 0.70, "dev": 0.15, "test": 0.15}
MAX_LEN = 300

HERE = os.path.dirname(os.path.abspath(__file__))
SEED_DIR = os.path.join(HERE, "seeds")
# Seeds written after the splits were first drawn, in batches (see `added_batches`). Each
# batch draws its variants, splits and compositions from a random stream of its own, so a new
# batch puts new lines into train / dev / test and leaves every earlier line where it was:
# numbers measured on the earlier test lines stay comparable.
ADDED_DIR = os.path.join(SEED_DIR, "added")
# The challenge set: messages written apart from the seeds, by the labelling rules alone, to
# check the router on phrasings no seed holds. A generated text with the loose key of one of
# its lines is dropped, so it stays out of every split (for any --seed).
CHALLENGE = os.path.join(HERE, "challenge.jsonl")

# Augmented variants drawn per seed (the seed itself is always kept as well).
N_VARIANTS = {
    ("trivial", "ko"): 10,
    ("trivial", "en"): 8,
    ("other", "ko"): 4,
    ("other", "en"): 4,
    ("short", "ko"): 3,
    ("short", "en"): 3,
}
N_TEMPLATE_FILLS = {"ko": 32, "en": 24}
N_HARDNEG_FILLS = {"ko": 16, "en": 14}
# Compositions (trivial phrase + request) made per request seed / template fill.
N_MIX_PER_SEED = 7
P_MIX_PER_TEMPLATE_FILL = 0.25
# Share of help/identity variants that get a leading greeting ("안녕! 너 누구야?").
P_GREETING_LEAD = 0.10
# Share of goodbye variants that get a leading thanks ("고마워! 잘가"): a closing
# thanks + farewell is still goodbye.
P_THANKS_LEAD = 0.10

# --------------------------------------------------------------------------
# Hangul helpers
# --------------------------------------------------------------------------
CHO = "ㄱㄲㄴㄷㄸㄹㅁㅂㅃㅅㅆㅇㅈㅉㅊㅋㅌㅍㅎ"
JUNG = "ㅏㅐㅑㅒㅓㅔㅕㅖㅗㅘㅙㅚㅛㅜㅝㅞㅟㅠㅡㅢㅣ"
JONG = ["", "ㄱ", "ㄲ", "ㄳ", "ㄴ", "ㄵ", "ㄶ", "ㄷ", "ㄹ", "ㄺ", "ㄻ", "ㄼ", "ㄽ", "ㄾ",
        "ㄿ", "ㅀ", "ㅁ", "ㅂ", "ㅄ", "ㅅ", "ㅆ", "ㅇ", "ㅈ", "ㅊ", "ㅋ", "ㅌ", "ㅍ", "ㅎ"]


def is_syllable(ch):
    return "\uac00" <= ch <= "\ud7a3"


def is_hangul(ch):
    return is_syllable(ch) or "\u3131" <= ch <= "\u318e" or "\u1100" <= ch <= "\u11ff"


def lang_of(text):
    return "ko" if any(is_hangul(c) for c in text) else "en"


def decompose(ch):
    code = ord(ch) - 0xAC00
    return code // 588, (code % 588) // 28, code % 28


def compose(l, v, t):
    return chr(0xAC00 + l * 588 + v * 28 + t)


def has_batchim(word):
    for ch in reversed(word):
        if is_syllable(ch):
            return decompose(ch)[2] != 0
        if ch.isalnum():
            return False
    return False


def rieul_final(word):
    for ch in reversed(word):
        if is_syllable(ch):
            return decompose(ch)[2] == 8
    return False


def josa(word, pair):
    """Attach a Korean particle: pair is 'with_batchim/without', e.g. '을/를'."""
    a, b = pair.split("/")
    if pair == "으로/로" and rieul_final(word):
        return word + b
    return word + (a if has_batchim(word) else b)


# Dubeolsik keyboard rows; neighbours are the keys left/right on the same row.
_KO_ROWS = ["ㅂㅈㄷㄱㅅ", "ㅁㄴㅇㄹㅎ", "ㅋㅌㅊㅍ", "ㅛㅕㅑㅐㅔ", "ㅗㅓㅏㅣ", "ㅠㅜㅡ"]
KO_NEIGHBOURS = {}
for _row in _KO_ROWS:
    for _i, _c in enumerate(_row):
        KO_NEIGHBOURS[_c] = [_row[j] for j in (_i - 1, _i + 1) if 0 <= j < len(_row)]
# Missed / extra shift key and the classic ㅐ/ㅔ confusion.
for _a, _b in [("ㄱ", "ㄲ"), ("ㄷ", "ㄸ"), ("ㅂ", "ㅃ"), ("ㅅ", "ㅆ"), ("ㅈ", "ㅉ"),
               ("ㅐ", "ㅒ"), ("ㅔ", "ㅖ"), ("ㅐ", "ㅔ")]:
    KO_NEIGHBOURS.setdefault(_a, []).append(_b)
    KO_NEIGHBOURS.setdefault(_b, []).append(_a)

# Frequent real-world misspellings / chat spellings (old, new).
KO_REPLACEMENTS = [
    ("습니다", "슴니다"), ("합니다", "함니다"), ("니다", "니당"), ("세요", "세여"),
    ("세요", "새요"), ("세요", "세용"), ("주세요", "주세여"), ("돼요", "되요"),
    ("됐", "됬"), ("거예요", "거에요"), ("했어", "햇어"), ("있어", "잇어"),
    ("있어", "있엉"), ("없어", "업어"), ("맛있", "마싯"), ("뭐", "머"), ("뭐", "모"),
    ("뭐야", "뭐냐"), ("누구야", "누구냐"), ("해줘", "해조"), ("해줘", "해줭"),
    ("알려줘", "알랴줘"), ("알려줘", "알려져"), ("고마워", "고마어"), ("고마워", "고마웡"),
    ("안녕", "안뇽"), ("안녕", "안농"), ("안녕", "앙녕"), ("반가워", "방가워"),
    ("반가워", "반가와"), ("좀", "쫌"), ("진짜", "진자"), ("진짜", "찐"),
    ("어떻게", "어떠케"), ("어떻게", "어케"), ("어떡해", "어떡케"), ("근데", "근대"),
    ("그리고", "그리구"), ("할 수", "할수"), ("먹고 싶", "먹고싶"), ("싶어", "시퍼"),
    ("싶어", "싶당"), ("이야", "이얌"), ("거야", "거얌"), ("괜찮", "괜찬"),
    ("감사", "감솨"), ("다음에", "담에"), ("나중에", "담에"), ("잘가", "잘가라"), ("이에요", "이예요"), ("예요", "에요"),
    ("알려", "갈켜"), ("근처", "근쳐"), ("식당", "식땅"), ("급식카드", "급식 카드"),
    ("급식카드", "급카"), ("떡볶이", "떡뽁이"), ("떡볶이", "떡복이"),
    ("돈까스", "돈가스"), ("짜장면", "자장면"), ("김밥", "김빱"), ("치킨", "치킹"),
]

EN_REPLACEMENTS = [
    ("what's", "whats"), ("what is", "whats"), ("i'm", "im"), ("i'm", "i am"),
    ("you're", "youre"), ("you're", "ur"), ("your", "ur"), ("you", "u"), ("you", "ya"),
    ("are", "r"), ("thanks", "thx"), ("thanks", "thanx"), ("thanks", "tnx"),
    ("thank you", "thank u"), ("thank you", "thankyou"), ("please", "pls"),
    ("please", "plz"), ("okay", "ok"), ("ok", "okay"), ("see you", "see ya"),
    ("see you", "c u"), ("going", "goin"), ("what", "wat"), ("because", "cuz"),
    ("tomorrow", "tmrw"), ("don't", "dont"), ("can't", "cant"), ("good night", "gnight"),
    ("how are", "how r"), ("hello", "helo"), ("hello", "hellooo"), ("hey", "heyy"),
    ("tonight", "tonite"), ("want to", "wanna"), ("going to", "gonna"),
    ("got to", "gotta"), ("restaurant", "restaurent"),
]

QWERTY_ROWS = ["qwertyuiop", "asdfghjkl", "zxcvbnm"]
QWERTY_NEIGHBOURS = {}
for _row in QWERTY_ROWS:
    for _i, _c in enumerate(_row):
        QWERTY_NEIGHBOURS[_c] = [_row[j] for j in (_i - 1, _i + 1) if 0 <= j < len(_row)]

# --------------------------------------------------------------------------
# Per-intent decoration vocab
# --------------------------------------------------------------------------
KO_SUFFIX_COMMON = ["!", "!!", "~", "~~", ".", "ㅎㅎ", "ㅋㅋ", "^^", " ㅎㅎ", " ^^", "!!!",
                    "~!", " 😊", "😊", "ㅎ", " ㅋㅋ", "~ㅎㅎ", "!ㅎㅎ"]
EN_SUFFIX_COMMON = ["!", "!!", ".", " :)", " :D", " 😊", "!!!", "~", " 😄", ""]
SUFFIX_EXTRA = {
    "greeting": (["?", " 👋", "👋", " 🙂", "~~ 👋", "~ 🙂"], ["?", " 👋", "👋", "! 👋", " 🙂"]),
    "thanks": ([" 🙏", "🙏", " ❤️", " 👍", "ㅠㅠ", "!! 🙏", " 🥰"], [" 🙏", "🙏", " ❤️", " 👍", "!! 🙏", " <3"]),
    "goodbye": ([" 👋", "👋", " 🙌", "~~ 👋", " 😊"], [" 👋", "👋", "! 👋", " 🙌", " xoxo"]),
    "help": (["?", "??", "?!", " ?", "ㅠㅠ", " 🤔", "? ㅎㅎ", "?ㅠ"], ["?", "??", " ?", " 🤔", "?!"]),
    "identity": (["?", "??", "?!", "ㅋㅋ", " 🤔", " 🤖", "?ㅋㅋ", "? ㅎㅎ"], ["?", "??", " 🤔", " 🤖", "? lol", "?!"]),
    "other": (["?", "??", "ㅠㅠ", " ㅠ", "...", " 🙏", "!"], ["?", "??", "...", " pls", " please", "!"]),
}
KO_DROP = {"thanks": {"?"}, "goodbye": {"?"}}
KO_PREFIX = {
    "greeting": ["저기", "음", "아", "어", "야", "오", "저기요", "봇아", "챗봇아", "음..", "아아"],
    "thanks": ["와", "오", "우와", "아", "헐", "음", "와 진짜", "오오", "아하", "오케이"],
    "goodbye": ["그럼", "자", "이제", "음", "아", "오케이", "ㅇㅋ", "넵", "알겠어", "그럼 이제"],
    "help": ["저기", "음", "근데", "저기요", "그래서", "아", "봇아", "챗봇아", "음..", "혹시"],
    "identity": ["근데", "저기", "음", "야", "아", "궁금한데", "그래서", "잠깐", "혹시", "근데 진짜"],
    "other": ["저기", "음", "아", "근데", "혹시", "저기요", "그럼", "음..", "아 맞다", "있잖아"],
}
EN_PREFIX = {
    "greeting": ["hey,", "oh", "um", "well", "oh hey,", "yo"],
    "thanks": ["oh", "wow", "ok", "ah", "oh nice,", "great,", "cool,"],
    "goodbye": ["ok", "alright", "well", "ok then", "anyway", "okay,", "alright then,"],
    "help": ["hey,", "um", "so", "uh", "hmm", "sorry,", "quick question,"],
    "identity": ["hey,", "so", "um", "wait", "btw", "hmm", "just curious,"],
    "other": ["hey,", "um", "so", "ok", "btw", "uh", "hmm", "also"],
}
GREETING_LEAD = {
    "ko": ["안녕", "안녕하세요", "ㅎㅇ", "하이", "반가워", "안뇽"],
    "en": ["hi", "hello", "hey", "hi there", "hey there"],
}
THANKS_LEAD = {
    "ko": ["고마워", "고마워요", "감사합니다", "감사해요", "ㄱㅅ", "땡큐", "오늘 고마웠어"],
    "en": ["thanks", "thank you", "thx", "ty", "thanks a lot", "thanks for the help"],
}
THANKS_WORDS = ("고마", "고맙", "감사", "ㄱㅅ", "ㄳ", "땡큐", "thank", "thx", "ty ")
KO_MIX_CONNECT = ["", "", "", "", "근데 ", "그리고 ", "아 근데 ", "혹시 ", "그럼 ", "참 ",
                  "아 맞다 ", "그런데 ", "질문 있는데 "]
EN_MIX_CONNECT = ["", "", "", "", "also ", "and ", "btw ", "oh and ", "by the way, ", "so ",
                  "quick question: ", "one more thing, "]
MIX_SEPS = [", ", "! ", " ", "~ ", "\n", ". ", "!! ", " ㅎㅎ ", "~~ "]
MIX_SEPS_EN = [", ", "! ", " ", "~ ", "\n", ". ", "!! ", " - "]
# Probability that the trivial part comes first in a composed message.
TRIVIAL_FIRST = {"greeting": 0.97, "identity": 0.9, "help": 0.85, "thanks": 0.5, "goodbye": 0.35}
# Chit-chat + thanks/goodbye ("배불러 고마워", "졸려 잘자") is often really thanks/goodbye,
# so chit-chat is only combined with greeting / help / identity.
CHAT_MIX_INTENTS = ["greeting", "greeting", "help", "identity"]
MIX_INTENT_WEIGHTS = [("greeting", 30), ("thanks", 25), ("goodbye", 15), ("help", 15), ("identity", 15)]

# --------------------------------------------------------------------------
# Request templates
# --------------------------------------------------------------------------
KO_FOODS = ["짜장면", "짬뽕", "떡볶이", "김밥", "치킨", "돈까스", "라면", "햄버거", "피자",
            "국밥", "순대", "김치찌개", "된장찌개", "비빔밥", "칼국수", "우동", "초밥", "마라탕",
            "제육볶음", "볶음밥", "샌드위치", "토스트", "쌀국수", "냉면", "만두", "떡국", "카레",
            "오므라이스", "부대찌개", "닭갈비", "순두부찌개", "죽", "도시락", "주먹밥", "덮밥",
            "탕수육", "핫도그", "샐러드", "파스타", "돈가스", "삼각김밥", "컵밥", "쫄면",
            "잔치국수", "콩나물국밥", "치즈돈까스", "불고기", "순대국", "백반", "분식"]
KO_PLACES = ["우리 학교", "학교", "집", "우리 집", "강남역", "홍대입구역", "신촌", "잠실",
             "수원역", "부산역", "서면", "대전역", "노원역", "성수동", "합정역", "건대입구역",
             "우리 동네", "학원", "지하철역", "버스 정류장", "도서관", "공원", "시청", "서현역",
             "일산", "마포구", "관악구", "강서구", "인천 구월동", "광주 충장로", "대구 동성로",
             "여기", "청주 터미널", "전주 한옥마을", "제주시청", "안양역", "의정부역"]
KO_TEMPLATES = [
    "{place} 근처 {food} 집 추천해줘",
    "{place} 근처 {food}집 추천해 주세요",
    "{food} 먹고 싶은데 급식카드 되는 곳 있어?",
    "{place}에서 {food} 먹을 수 있는 데 있어?",
    "{place} 쪽에 {food} 맛집 알려줘",
    "{food:을/를} 급식카드로 먹을 수 있어?",
    "{food} 파는 곳 중에 급식카드 되는 데",
    "{place} 주변 {food} 가게 지금 열었어?",
    "{place} 근처에 싼 {food} 집 있어?",
    "오늘 {food:이/가} 너무 먹고 싶어",
    "{food:이랑/랑} {food2} 중에 뭐 먹지?",
    "{food} 말고 다른 거 추천해줘",
    "{place}에서 가까운 {food} 집 어디야",
    "{food} 보통 얼마쯤 해?",
    "{food} 배달 되는 곳 있어?",
    "{place} 근처 {food} 맛있는 데 어디야?",
    "{food} 먹으러 갈 건데 {place} 근처에 있어?",
    "저녁에 {food} 먹고 싶은데 어디가 좋아?",
    "점심으로 {food} 어때?",
    "{place} 근처에 일요일에도 여는 {food} 집 있어?",
    "{place} 근처 {food} 집 몇 시까지 해?",
    "{place} 근처 {food} 집 급식카드 돼요?",
    "{food} 5000원 이하로 먹을 수 있는 곳",
    "{place} 앞에 {food} 파는 데 알려줘",
    "{food} 포장 되는 데 {place} 근처에 있어?",
    "혼자 {food} 먹을 수 있는 곳 {place} 근처에",
    "{place}에서 걸어갈 수 있는 {food} 집",
    "{place} 근처 급식카드 가맹점 중에 {food} 집 있어요?",
    "{food} 땡기는데 어디 가지",
    "{place} 근처에 {food} 말고 {food2} 파는 곳",
    "{place} 근처 {food} 맛집",
    "{place} 근처 {food}",
    "{food} 먹고 싶어요 {place} 근처로 찾아주세요",
    "급식카드로 {food} 사 먹을 수 있는 데 {place}에 있나요?",
    "{place} 근처에 지금 문 연 {food} 집",
    "{food} 먹어도 돼? 급식카드로",
    "{place} 가는 길에 {food} 먹을 데",
    "아 {food} 먹고 싶다 {place} 근처에 없나",
]
EN_FOODS = [  # (form used before "place", plural/mass form)
    ("pizza", "pizza"), ("burger", "burgers"), ("fried chicken", "fried chicken"),
    ("tteokbokki", "tteokbokki"), ("kimbap", "kimbap"), ("jajangmyeon", "jajangmyeon"),
    ("ramen", "ramen"), ("noodle", "noodles"), ("sandwich", "sandwiches"), ("sushi", "sushi"),
    ("bibimbap", "bibimbap"), ("dumpling", "dumplings"), ("pasta", "pasta"), ("curry", "curry"),
    ("fried rice", "fried rice"), ("hot dog", "hot dogs"), ("tonkatsu", "tonkatsu"),
    ("salad", "salad"), ("soup", "soup"), ("toast", "toast"), ("udon", "udon"),
    ("chicken", "chicken"), ("bulgogi", "bulgogi"), ("Chinese food", "Chinese food"),
    ("Korean food", "Korean food"), ("gimbap", "gimbap"), ("cup noodle", "cup noodles"),
    ("dosirak", "dosirak"), ("taco", "tacos"), ("rice bowl", "rice bowls"),
]
EN_PLACES = ["my school", "school", "my house", "home", "here", "Gangnam Station", "Hongdae",
             "Sinchon", "Jamsil", "the library", "the subway station", "my academy", "the park",
             "Busan Station", "City Hall", "Seoul Station", "Suwon Station", "my apartment",
             "the bus stop", "me", "Itaewon", "Myeongdong", "my hagwon", "Daejeon Station"]
EN_TEMPLATES = [
    "where can I get {food} near {place}?",
    "any {food_a} places near {place}?",
    "I want {food} for lunch",
    "is there a {food_a} place open near {place}?",
    "cheap {food} around {place}",
    "can I buy {food} with my meal card?",
    "best {food} near {place}?",
    "where can I eat {food} with my card?",
    "I'm craving {food}, any place near {place}?",
    "{food} near {place} that takes the meal card",
    "how much does {food} usually cost?",
    "recommend a {food_a} place near {place}",
    "I want {food}, where should I go?",
    "is there a place near {place} that sells {food}?",
    "{food} or {food2}? which one should I eat?",
    "find {food} near {place}",
    "anywhere near {place} open on sunday for {food}?",
    "does the {food_a} place near {place} accept the card?",
    "can I get {food} delivered to my house?",
    "something other than {food} near {place}",
    "I'm hungry, is there {food} near {place}?",
    "which {food_a} place near {place} takes the children's meal card?",
    "{food} place near {place} open now",
    "can you find {food} near {place}?",
    "what time does the {food_a} place near {place} close?",
    "I feel like {food} tonight",
]

# Hard-negative templates: questions that look like identity / help but are about other
# people or about the card / kiosk / app, not about the bot ("쟤 누구야?", "키오스크 어떻게 써?").
KO_WHO = ["쟤", "걔", "이분", "그분", "저분", "저 사람", "그 사람", "이 사람", "사장님",
          "그 가게 사장님", "알바생", "거기 직원", "주방장", "배달 기사님", "그 식당 주인",
          "담임 선생님", "우리 선생님", "내 짝꿍", "옆집 아저씨", "그 유튜버", "주민센터 직원",
          "담당 공무원", "카운터에 있는 사람", "저 아줌마", "저 형"]
KO_THINGS = ["급식카드", "꿈나무카드", "이 카드", "키오스크", "배달앱", "쿠폰", "포인트", "카드 앱",
             "교통카드", "체크카드", "주문 기계", "셀프 계산대", "이 쿠폰", "모바일 카드",
             "카드 리더기", "아동급식카드", "기프티콘", "선불카드", "급식카드 앱", "잔액 조회 앱"]
KO_HARDNEG_TEMPLATES = [
    "{who} 누구야?",
    "{who:은/는} 누구예요?",
    "{who} 이름이 뭐야?",
    "{who} 이름 알아?",
    "{who} 몇 살이야?",
    "{who} 사람 좋아?",
    "{who:이/가} 누구지?",
    "{who:이/가} 만든 거야?",
    "{thing} 어떻게 써?",
    "{thing} 사용법 알려줘",
    "{thing} 쓰는 법 좀 알려줘",
    "{thing:으로/로} 뭐 할 수 있어?",
    "{thing:은/는} 어떻게 이용해요?",
    "{thing} 기능 알려줘",
    "{thing} 사용 방법이 뭐야?",
    "{thing:이/가} 뭐야?",
    "{thing} 처음 쓰는데 어떻게 해?",
]
EN_WHO = ["the owner", "that guy", "that lady", "the chef", "the staff there", "the delivery guy",
          "my teacher", "the cashier", "that person", "the manager", "that youtuber",
          "the person at the counter", "the community center worker", "the lady at the store",
          "my friend's mom"]
EN_THINGS = ["the meal card", "my card", "the kiosk", "the delivery app", "this coupon",
             "the card app", "the self-checkout", "the card reader", "the point card", "the dream card",
             "a transit card", "the balance app", "a gift card", "the order machine"]
EN_HARDNEG_TEMPLATES = [
    "who is {who}?",
    "what's {who_s} name?",
    "how old is {who}?",
    "do you know {who}?",
    "is {who} nice?",
    "how do I use {thing}?",
    "how does {thing} work?",
    "what can I do with {thing}?",
    "what is {thing}?",
    "explain {thing} to me",
    "is there a guide for {thing}?",
    "I don't know how to use {thing}",
]

# --------------------------------------------------------------------------
# Seed loading
# --------------------------------------------------------------------------


def load_seeds(folder=SEED_DIR):
    """Return list of dicts: intent, section, text (in file order, intents in fixed order).
    A folder need not hold a file for every intent."""
    seeds = []
    for intent in INTENTS:
        path = os.path.join(folder, intent + ".txt")
        if not os.path.exists(path):
            continue
        section = "main" if intent != "other" else "request"
        seen = set()
        with open(path, encoding="utf-8") as f:
            for raw in f:
                line = unicodedata.normalize("NFC", raw.rstrip("\n")).strip()
                if not line:
                    continue
                if line.startswith("#"):
                    body = line.lstrip("#").strip()
                    if body.startswith("[") and body.endswith("]"):
                        section = body[1:-1].strip()
                    continue
                if line in seen:
                    continue
                seen.add(line)
                seeds.append({"intent": intent, "section": section, "text": line})
    return seeds


# --------------------------------------------------------------------------
# Augmentation primitives
# --------------------------------------------------------------------------


def split_tail(text):
    """Split into (core, tail) where tail is trailing punctuation / emoji / spaces."""
    i = len(text)
    while i > 0 and not text[i - 1].isalnum():
        i -= 1
    return text[:i], text[i:]


def ko_jamo_typo(rng, s):
    idx = [i for i, c in enumerate(s) if is_syllable(c)]
    if len(idx) < 3:
        return None
    i = rng.choice(idx)
    l, v, t = decompose(s[i])
    which = rng.choice(["cho", "jung", "jung"])
    if which == "cho":
        cands = KO_NEIGHBOURS.get(CHO[l], [])
        cands = [c for c in cands if c in CHO]
        if not cands:
            return None
        l = CHO.index(rng.choice(cands))
    else:
        cands = KO_NEIGHBOURS.get(JUNG[v], [])
        cands = [c for c in cands if c in JUNG]
        if not cands:
            return None
        v = JUNG.index(rng.choice(cands))
    return s[:i] + compose(l, v, t) + s[i + 1:]


def ko_replacement(rng, s):
    cands = [(a, b) for a, b in KO_REPLACEMENTS if a in s and a != b]
    if not cands:
        return None
    a, b = rng.choice(cands)
    # replace one occurrence (the last one: endings matter most)
    pos = s.rfind(a)
    return s[:pos] + b + s[pos + len(a):]


def ko_ending(rng, s):
    """요/용/여/염 style ending variants and cute final-ㅇ (고마워 -> 고마웡)."""
    if not s or not is_syllable(s[-1]):
        return None
    last = s[-1]
    if last == "요":
        return s[:-1] + rng.choice(["용", "여", "염", "욤", "요오"])
    if s.endswith("니다"):
        return s[:-1] + rng.choice(["당", "닷", "다아"])
    l, v, t = decompose(last)
    if last in "어워아와해줘지게래":
        pick = rng.choice(["ng", "yong", "yo"])
    elif t == 0:
        pick = "ng"
    else:
        return None
    if pick == "ng":
        return s[:-1] + compose(l, v, 21)  # add final ㅇ
    if pick == "yong":
        return s + "용"
    return s + "요"


def ko_space_remove(rng, s):
    if " " not in s:
        return None
    if rng.random() < 0.6:
        return s.replace(" ", "")
    parts = s.split(" ")
    j = rng.randrange(len(parts) - 1)
    return " ".join(parts[:j]) + (" " if j else "") + parts[j] + parts[j + 1] + \
        ("" if j + 2 >= len(parts) else " " + " ".join(parts[j + 2:]))


def ko_space_insert(rng, s):
    positions = [i for i in range(1, len(s) - 1)
                 if is_syllable(s[i - 1]) and is_syllable(s[i]) and is_syllable(s[i + 1]) and
                 (i < 2 or s[i - 2] != " ")]
    if not positions:
        return None
    i = rng.choice(positions)
    return s[:i] + " " + s[i:]


def repeat_short(rng, s):
    if not s or len(s.replace(" ", "")) > 5 or " " in s:
        return None
    return rng.choice([s + s, s + " " + s, s + s + s if len(s) <= 2 else s + " " + s])


def en_casing(rng, s):
    modes = ["lower", "lower", "cap", "cap", "upper"]
    if len(s.split()) <= 3:
        modes.append("title")
    mode = rng.choice(modes)
    if mode == "lower":
        r = s.lower()
    elif mode == "upper":
        r = s.upper()
    elif mode == "title":
        r = s.title()
    else:
        r = s[:1].upper() + s[1:]
    return r if r != s else None


def en_replacement(rng, s):
    low = s.lower()
    cands = []
    for a, b in EN_REPLACEMENTS:
        pos = low.find(a)
        while pos != -1:
            before_ok = pos == 0 or not low[pos - 1].isalnum()
            end = pos + len(a)
            after_ok = end == len(low) or not low[end].isalnum()
            if before_ok and after_ok:
                cands.append((pos, a, b))
                break
            pos = low.find(a, pos + 1)
    if not cands:
        return None
    pos, a, b = rng.choice(cands)
    return s[:pos] + b + s[pos + len(a):]


def en_typo(rng, s):
    words = [(i, w) for i, w in enumerate(s.split(" ")) if len(w) >= 4 and w.isalpha()]
    if not words:
        return None
    wi, w = rng.choice(words)
    kind = rng.choice(["swap", "drop", "double", "neighbour"])
    j = rng.randrange(1, len(w) - 1) if len(w) > 2 else 1
    if kind == "swap":
        nw = w[:j] + w[j + 1] + w[j] + w[j + 2:]
    elif kind == "drop":
        nw = w[:j] + w[j + 1:]
    elif kind == "double":
        nw = w[:j] + w[j] + w[j:]
    else:
        c = w[j].lower()
        if c not in QWERTY_NEIGHBOURS:
            return None
        nw = w[:j] + rng.choice(QWERTY_NEIGHBOURS[c]) + w[j + 1:]
    if nw == w:
        return None
    parts = s.split(" ")
    parts[wi] = nw
    return " ".join(parts)


def en_elongate(rng, s):
    if not s or not s[-1].isalpha() or s[-1].lower() not in "aeiouyshn":
        return None
    return s + s[-1] * rng.choice([1, 2, 3])


def en_repeat(rng, s):
    if " " in s or len(s) > 5:
        return None
    return rng.choice([s + " " + s, s + s]) if len(s) <= 3 else s + " " + s


# --------------------------------------------------------------------------
# Variant generation
# --------------------------------------------------------------------------


def clean(text):
    text = text.strip()
    while "  " in text:
        text = text.replace("  ", " ")
    return text


QUESTION_SUFFIX = {
    "ko": ["?", "?", "??", "???", "?!", " ?", "?ㅎㅎ", "? ㅎㅎ", "?ㅋㅋ", "?ㅠㅠ", "? 🤔", "?😊", ""],
    "en": ["?", "?", "??", "???", " ?", "?!", "? :)", "? 🤔", ""],
}
OTHER_STATEMENT_SUFFIX = {
    "ko": ["", "!", "~", "ㅠㅠ", " ㅠ", "...", " 🙏", "ㅎㅎ", "..", "!!", "ㅜㅜ", " 😋"],
    "en": ["", "!", "...", " pls", " please", "!!", " 🙏", " :("],
}


def pick_suffix(rng, intent, lang, is_question):
    if is_question and (intent in ("help", "identity", "other") or rng.random() < 0.8):
        pool = list(QUESTION_SUFFIX[lang])
        if intent == "identity":
            pool += ["? 🤖"] if lang == "en" else ["? 🤖", "?ㅋㅋㅋ"]
        return rng.choice(pool)
    if intent == "other":
        return rng.choice(OTHER_STATEMENT_SUFFIX[lang])
    extra_ko, extra_en = SUFFIX_EXTRA[intent]
    if lang == "ko":
        pool = [x for x in KO_SUFFIX_COMMON + extra_ko + extra_ko
                if x.strip() not in KO_DROP.get(intent, set())]
    else:
        pool = EN_SUFFIX_COMMON + extra_en + extra_en
    if intent in ("help", "identity") and rng.random() < 0.5:
        pool = [x for x in pool if "?" in x] or pool
    return rng.choice(pool)


SHORT_SUFFIX = {"ko": ["?", "??", "!", "~", "..", "ㅋㅋ", "ㅎㅎ", "ㅠㅠ", ""],
                "en": ["?", "!", "...", " lol", "."]}


def make_variant(rng, text, intent, lang, light=False, section=None):
    core, tail = split_tail(text)
    if not core:  # e.g. "?", "😊", "..."
        return text + rng.choice(["", text[-1:], text[-1:] * 2]) if text else None
    is_question = "?" in tail
    ops_ko = [("typo", 1), ("repl", 4), ("ending", 2), ("sp_rm", 2), ("sp_ins", 1), ("repeat", 1)]
    ops_en = [("case", 4), ("repl", 3), ("typo", 1), ("elong", 1), ("repeat", 1)]
    ops = ops_ko if lang == "ko" else ops_en
    n_ops = rng.choice([0, 0, 1, 1, 1, 2] if not light else [0, 0, 0, 1, 1])
    applied = set()
    for _ in range(n_ops):
        total = sum(w for _, w in ops)
        r = rng.uniform(0, total)
        acc = 0
        op = ops[-1][0]
        for name, w in ops:
            acc += w
            if r <= acc:
                op = name
                break
        if lang == "ko":
            fn = {"typo": ko_jamo_typo, "repl": ko_replacement, "ending": ko_ending,
                  "sp_rm": ko_space_remove, "sp_ins": ko_space_insert, "repeat": repeat_short}[op]
        else:
            fn = {"case": en_casing, "repl": en_replacement, "typo": en_typo,
                  "elong": en_elongate, "repeat": en_repeat}[op]
        if light and op in ("repeat", "ending") and intent == "other":
            continue
        if op in applied or ({op} | applied) >= {"repl", "ending"} or \
                ("repeat" in applied and op == "typo"):
            continue  # one change of each kind; never stack spelling changes on the ending
        new = fn(rng, core)
        if new:
            core = new
            applied.add(op)
    # tail / suffix
    r = rng.random()
    if section == "short":
        if r < 0.7:
            tail = rng.choice(SHORT_SUFFIX[lang])
        out = clean(core + tail)
        return out.lower() if lang == "en" and rng.random() < 0.3 else out
    if r < 0.55:
        tail = pick_suffix(rng, intent, lang, is_question)
    elif r < 0.7 and not is_question:
        tail = ""
    # prefix
    prefix = ""
    p_prefix = 0.18 if light else 0.28
    roll = rng.random()
    if roll < p_prefix:
        prefix = rng.choice((KO_PREFIX if lang == "ko" else EN_PREFIX)[intent])
        if prefix == "혹시" and not is_question:
            prefix = "저기"
        sep = rng.choice([" ", " ", " ", "~ ", ", "]) if lang == "ko" and not prefix.endswith(("..", ",")) else " "
        if lang == "en" and prefix.endswith(","):
            sep = " "
        prefix = prefix + sep
        if lang == "en":
            letters = [c for c in core if c.isalpha()]
            if letters and all(c.isupper() for c in letters):
                prefix = prefix.upper()  # shouting: keep it consistent
            elif core[:1].isupper() and not core.startswith(("I ", "I'")) and core != "I":
                core = core[:1].lower() + core[1:]
    elif intent in ("help", "identity") and roll < p_prefix + P_GREETING_LEAD:
        lead = rng.choice(GREETING_LEAD[lang])
        sep = rng.choice(["! ", ", ", "~ ", " ", "!! "]) if lang == "ko" else rng.choice(["! ", ", ", " "])
        prefix = lead + sep
    elif intent == "goodbye" and roll < p_prefix + P_THANKS_LEAD and \
            not any(w in (core + " ").lower() for w in THANKS_WORDS):
        lead = rng.choice(THANKS_LEAD[lang])
        sep = rng.choice(["! ", ", ", "~ ", " ", "ㅎㅎ "]) if lang == "ko" else rng.choice(["! ", ", ", " ", ". "])
        prefix = lead + sep
    out = clean(prefix + core + tail)
    if lang == "en" and rng.random() < 0.08:
        out = out.lower()
    return out


def variants_for(rng, seed, n, light):
    text, intent = seed["text"], seed["intent"]
    lang = lang_of(text)
    out = [text]
    seen = {text}
    tries = 0
    while len(out) < n + 1 and tries < n * 12:
        tries += 1
        v = make_variant(rng, text, intent, lang, light=light, section=seed["section"])
        if not v or v in seen or len(v) > MAX_LEN:
            continue
        # never let an augmentation change the language of the text
        if lang_of(v) != lang:
            continue
        seen.add(v)
        out.append(v)
    return out


# --------------------------------------------------------------------------
# Templates
# --------------------------------------------------------------------------


def fill_ko(rng, tpl):
    food = rng.choice(KO_FOODS)
    food2 = rng.choice([f for f in KO_FOODS if f != food])
    place = rng.choice(KO_PLACES)
    slots = [("food", food), ("food2", food2), ("place", place)]
    if "{who" in tpl:
        slots.append(("who", rng.choice(KO_WHO)))
    if "{thing" in tpl:
        slots.append(("thing", rng.choice(KO_THINGS)))
    out = tpl
    for key, word in slots:
        while "{" + key + ":" in out:
            start = out.index("{" + key + ":")
            end = out.index("}", start)
            pair = out[start + len(key) + 2:end]
            out = out[:start] + josa(word, pair) + out[end + 1:]
        out = out.replace("{" + key + "}", word)
    out = out.replace("여기 근처", "이 근처").replace("여기에서", "여기서")
    return out


def fill_en(rng, tpl):
    fa, fp = rng.choice(EN_FOODS)
    fa2, fp2 = rng.choice([f for f in EN_FOODS if f[0] != fa])
    place = rng.choice(EN_PLACES)
    out = tpl.replace("{food_a}", fa).replace("{food2}", fp2).replace("{food}", fp)
    out = out.replace("{place}", place)
    if "{who" in out:
        who = rng.choice(EN_WHO)
        out = out.replace("{who_s}", who + "'s").replace("{who}", who)
    if "{thing}" in out:
        out = out.replace("{thing}", rng.choice(EN_THINGS))
    return out[:1].upper() + out[1:] if rng.random() < 0.4 else out


def template_items(rng):
    groups = []
    for lang, tpls, filler in (("ko", KO_TEMPLATES + KO_HARDNEG_TEMPLATES, fill_ko),
                               ("en", EN_TEMPLATES + EN_HARDNEG_TEMPLATES, fill_en)):
        n_request = len(KO_TEMPLATES if lang == "ko" else EN_TEMPLATES)
        for ti, tpl in enumerate(tpls):
            n_fills = (N_TEMPLATE_FILLS if ti < n_request else N_HARDNEG_FILLS)[lang]
            texts, seen = [], set()
            tries = 0
            while len(texts) < n_fills and tries < 400:
                tries += 1
                t = filler(rng, tpl)
                if rng.random() < 0.35:
                    t = make_variant(rng, t, "other", lang, light=True)
                t = clean(t)
                if t in seen or len(t) > MAX_LEN or lang_of(t) != lang:
                    continue
                seen.add(t)
                texts.append(t)
            groups.append({"key": "other|tpl|%s|%02d" % (lang, ti), "intent": "other",
                           "section": "template", "lang": lang, "texts": texts})
    return groups


# --------------------------------------------------------------------------
# Grouping / splitting
# --------------------------------------------------------------------------


def norm_key(text):
    """Loose key for near-duplicate detection: lowercase, letters/digits/Hangul only,
    runs of the same character collapsed ("byeee" == "bye!", "안녕~~" == "안녕")."""
    t = unicodedata.normalize("NFKC", text).lower()
    k = ""
    for c in t:
        if c.isalnum() and not (k and k[-1] == c):
            k += c
    return k if k else text.strip()


class DSU:
    def __init__(self, n):
        self.p = list(range(n))

    def find(self, x):
        while self.p[x] != x:
            self.p[x] = self.p[self.p[x]]
            x = self.p[x]
        return x

    def union(self, a, b):
        a, b = self.find(a), self.find(b)
        if a != b:
            if a > b:
                a, b = b, a
            self.p[b] = a


def content_words(text):
    """Lowercased NFKC words (letters, digits, Hangul, apostrophes) of a seed."""
    t = unicodedata.normalize("NFKC", text).lower()
    words, cur = [], ""
    for c in t + " ":
        if c.isalnum() or c == "'":
            cur += c
        elif cur:
            words.append(cur.strip("'"))
            cur = ""
    return [w for w in words if w]


def anchor_clusters(groups, cluster_list, frame_groups):
    """Keys of the clusters that must be in train: one per seed family.

    A family is the seeds of one intent that share a content word, directly or through other
    seeds of the family; a word that seeds of three or more intents use (bot, ok, 너, 알려줘…)
    is a frame, not content (counted over `frame_groups`).  The family's shortest seed (its
    cluster) is the anchor, so every expression the seeds hold is in train and dev / test
    hold other phrasings of it."""
    intents_of = defaultdict(set)
    for g in frame_groups:
        if "seed" in g:
            for w in content_words(g["seed"]):
                intents_of[w].add(g["intent"])
    frame = {w for w, its in intents_of.items() if len(its) >= 3}
    cluster_of = {}
    for c in cluster_list:
        for m in c["members"]:
            cluster_of[m] = c["key"]
    dsu = DSU(len(groups))
    owner = {}
    for gi, g in enumerate(groups):
        if "seed" not in g:
            continue
        for w in content_words(g["seed"]):
            if w in frame:
                continue
            k = (g["intent"], w)
            if k in owner:
                dsu.union(owner[k], gi)
            else:
                owner[k] = gi
    best = {}
    for gi, g in enumerate(groups):
        if "seed" not in g:
            continue
        root = dsu.find(gi)
        cand = (len(g["seed"]), gi)
        if root not in best or cand < best[root]:
            best[root] = cand
    return frozenset(cluster_of[gi] for _, gi in best.values())


def assign_splits(rng, clusters, anchored=frozenset()):
    """clusters: list of dicts with key, intent, lang, size. Greedy stratified by (intent, lang).
    Clusters whose key is in `anchored` go to train; the rest fill the splits around them."""
    strata = defaultdict(list)
    for c in clusters:
        strata[(c["intent"], c["lang"])].append(c)
    assignment = {}
    for stratum in sorted(strata):
        cl = sorted(strata[stratum], key=lambda c: c["key"])
        rng.shuffle(cl)
        cl.sort(key=lambda c: -c["size"])  # stable: big groups first, ties keep shuffled order
        counts = {s: 0 for s in SPLITS}
        total = 0
        for c in cl:
            if c["key"] in anchored:
                assignment[c["key"]] = "train"
                counts["train"] += c["size"]
                total += c["size"]
        cl = [c for c in cl if c["key"] not in anchored]
        for c in cl:
            total += c["size"]
            best = max(SPLITS, key=lambda s: (SPLIT_FRAC[s] * total - counts[s], -SPLITS.index(s)))
            counts[best] += c["size"]
            assignment[c["key"]] = best
    return assignment


# --------------------------------------------------------------------------
# Composition: trivial phrase + request  ->  other
# --------------------------------------------------------------------------


def compose_mix(rng, trivial_text, trivial_intent, request_text, r_lang,
                force_trivial_first=False, allow_connector=True):
    t_core, t_tail = split_tail(trivial_text)
    trivial_first = force_trivial_first or rng.random() < TRIVIAL_FIRST[trivial_intent]
    if trivial_first:
        if t_tail.strip() and rng.random() < 0.6:
            sep = rng.choice([" ", " ", "\n", "  "])
            head = trivial_text
        else:
            seps = MIX_SEPS if r_lang == "ko" else MIX_SEPS_EN
            sep = rng.choice(seps)
            head = t_core
        conn = rng.choice(KO_MIX_CONNECT if r_lang == "ko" else EN_MIX_CONNECT) if allow_connector else ""
        if conn.strip() in ("혹시", "질문 있는데", "quick question:") and "?" not in request_text:
            conn = "근데 " if r_lang == "ko" else "also "
        req = request_text
        if conn and r_lang == "en" and req[:1].isupper() and not req.startswith(("I ", "I'")):
            req = req[:1].lower() + req[1:]
        text = head + sep + conn + req
    else:
        r_core, r_tail = split_tail(request_text)
        if r_tail.strip() and rng.random() < 0.6:
            body = request_text
            sep = rng.choice([" ", "\n", " "])
        else:
            body = r_core
            sep = rng.choice(MIX_SEPS if r_lang == "ko" else MIX_SEPS_EN)
        text = body + sep + trivial_text
    # keep newlines, squeeze double spaces elsewhere
    text = "\n".join(clean(part) for part in text.split("\n"))
    return text.strip()


# --------------------------------------------------------------------------
# Main
# --------------------------------------------------------------------------


def seed_groups(rng, seeds, prefix=""):
    """One group per seed: the seed and its augmented variants."""
    groups = []
    for i, s in enumerate(seeds):
        lang = lang_of(s["text"])
        if s["intent"] in TRIVIAL:
            n, light = N_VARIANTS[("trivial", lang)], False
        elif s["section"] == "short":
            n, light = N_VARIANTS[("short", lang)], True
        else:
            n, light = N_VARIANTS[("other", lang)], True
        texts = variants_for(rng, s, n, light)
        groups.append({"key": "%s%s|seed|%04d" % (prefix, s["intent"], i), "intent": s["intent"],
                       "section": s["section"], "lang": lang, "texts": texts,
                       "seed": s["text"]})
    return groups


def drop_cross_intent(groups, taken):
    """Drop texts whose normalised form two intents claim, and texts whose normalised form
    `taken` already holds; returns (such forms two intents claim, texts dropped for them,
    texts dropped as taken)."""
    norm_intents = defaultdict(set)
    for g in groups:
        for t in g["texts"]:
            norm_intents[norm_key(t)].add(g["intent"])
    conflicts = {k for k, v in norm_intents.items() if len(v) > 1}
    n_conflict = n_taken = 0
    for g in groups:
        kept = []
        for t in g["texts"]:
            k = norm_key(t)
            if k in conflicts:
                n_conflict += 1
            elif k in taken:
                n_taken += 1
            else:
                kept.append(t)
        g["texts"] = kept
    return len(conflicts), n_conflict, n_taken


def split_groups(rng, groups, anchors, frame_groups):
    """Merge groups of one intent that share a normalised text, anchor one group of every seed
    family in train and assign the rest; returns (split of each group, cluster key of each)."""
    dsu = DSU(len(groups))
    owner = {}
    for gi, g in enumerate(groups):
        for t in g["texts"]:
            k = norm_key(t)
            if k in owner:
                dsu.union(owner[k], gi)
            else:
                owner[k] = gi
    clusters = defaultdict(list)
    for gi in range(len(groups)):
        clusters[dsu.find(gi)].append(gi)
    cluster_list = []
    for root in sorted(clusters):
        members = clusters[root]
        g0 = groups[members[0]]
        size = sum(len(groups[m]["texts"]) for m in members)
        cluster_list.append({"key": g0["key"], "intent": g0["intent"], "lang": g0["lang"],
                             "size": size, "members": members})
    anchored = anchor_clusters(groups, cluster_list, frame_groups) if anchors else frozenset()
    assignment = assign_splits(rng, cluster_list, anchored)
    split_of_group, cluster_of = {}, {}
    for c in cluster_list:
        for m in c["members"]:
            split_of_group[m] = assignment[c["key"]]
            cluster_of[m] = c["key"]
    return split_of_group, cluster_of


def compositions(rng, groups, split_of_group, cluster_of, trivial_pool, taken_norm):
    """Trivial phrase + request / chat / hard-negative seed or template fill -> other, built
    only from pieces of one split; `taken_norm` (loose key -> {(split, intent)}) grows."""
    mix_items = []
    intents_w = [it for it, w in MIX_INTENT_WEIGHTS for _ in range(w)]
    for gi, g in enumerate(groups):
        if g["intent"] != "other" or g["section"] not in ("request", "chat", "hardneg", "template"):
            continue
        split = split_of_group[gi]
        if g["section"] == "template":
            bases = [(t, True) for t in g["texts"] if rng.random() < P_MIX_PER_TEMPLATE_FILL]
        else:
            # mostly the clean seed; sometimes an augmented variant (then without connector,
            # so that fillers do not pile up)
            if not g["texts"]:
                continue
            n_var = N_MIX_PER_SEED // 3 if len(g["texts"]) > 1 else 0
            bases = [(g["texts"][0], True)] * (N_MIX_PER_SEED - n_var) + \
                    [(rng.choice(g["texts"][1:]), False) for _ in range(n_var)]
        for base, allow_conn in bases:
            r_lang = lang_of(base)
            t_intent = rng.choice(intents_w if g["section"] != "chat" else CHAT_MIX_INTENTS)
            t_lang = r_lang if rng.random() < 0.92 else ("en" if r_lang == "ko" else "ko")
            pool = trivial_pool[(split, t_intent, t_lang)]
            if not pool:
                continue
            trivial_text = rng.choice(pool)
            text = compose_mix(rng, trivial_text, t_intent, base, r_lang,
                               force_trivial_first=g["section"] == "chat",
                               allow_connector=allow_conn)
            if not text or len(text) > MAX_LEN:
                continue
            k = norm_key(text)
            prev = taken_norm.get(k)
            if prev and any(ps != split or pit != "other" for ps, pit in prev):
                continue  # would leak across splits or clash with a trivial label
            taken_norm.setdefault(k, set()).add((split, "other"))
            mix_items.append((split, text, "other", "mix", cluster_of[gi]))
    return mix_items


def add_trivial(pool, groups, split_of_group):
    """Adds the groups' trivial texts to `pool`, keyed by (split, intent, language)."""
    for gi, g in enumerate(groups):
        if g["intent"] in TRIVIAL:
            for t in g["texts"]:
                pool[(split_of_group[gi], g["intent"], lang_of(t))].append(t)


def held_out_keys():
    """Loose keys of the challenge set's lines."""
    with open(CHALLENGE, encoding="utf-8") as f:
        return frozenset(norm_key(json.loads(line)["text"]) for line in f if line.strip())


def dedup(items, held_out, taken_texts):
    """Exact dedup by stripped text; drop texts with two labels, texts `taken_texts` holds and
    texts whose loose key is in `held_out`. Returns ({split: {text: intent}}, cluster key of
    each text, lines dropped for two labels)."""
    by_text = defaultdict(set)
    for s, t, it, *_ in items:
        by_text[t.strip()].add(it)
    out = {s: {} for s in SPLITS}
    cluster_of_text = {}
    n_label_conflict = 0
    for s, t, it, origin, ckey in items:
        t = t.strip()
        if len(by_text[t]) > 1:
            n_label_conflict += 1
            continue
        if not t or len(t) > MAX_LEN or t in taken_texts or norm_key(t) in held_out:
            continue
        out[s].setdefault(t, it)
        cluster_of_text.setdefault(t, ckey)
    return out, cluster_of_text, n_label_conflict


def new_stats():
    """What the parts built so far share: counts for the report, every group (for frame words),
    the trivial phrases per (split, intent, language), the loose keys taken with their (split,
    intent), the challenge set's loose keys and each text's cluster key."""
    return {"norm_conflicts": 0, "dropped_norm_conflict": 0, "dropped_label_conflict": 0,
            "mix": 0, "cluster_of_text": {}, "frame_groups": [],
            "trivial_pool": {(s, it, lg): [] for s in SPLITS for it in TRIVIAL
                             for lg in ("ko", "en")},
            "taken_norm": {}, "held_out": held_out_keys()}


def build_part(rng, groups, parts, stats, anchors=True):
    """One part of the data from its groups, on the random stream `rng`: texts two intents
    claim dropped, and (for a later part) texts whose loose key an earlier line of `parts`
    already has; split (its own families anchored in train); composed with trivial phrases of
    its split; deduplicated. So no earlier line moves, changes or goes. Returns ({split: {text:
    intent}}, texts dropped as near-duplicates of earlier lines)."""
    taken_norm = stats["taken_norm"]
    n_conflicts, n_dropped, n_taken = drop_cross_intent(groups, taken_norm)
    stats["frame_groups"] = stats["frame_groups"] + groups
    split_of_group, cluster_of = split_groups(rng, groups, anchors, stats["frame_groups"])
    items = []  # (split, text, intent, origin, cluster key)
    for gi, g in enumerate(groups):
        for t in g["texts"]:
            items.append((split_of_group[gi], t, g["intent"], g["section"], cluster_of[gi]))
    # compositions, built only from pieces of the same split
    add_trivial(stats["trivial_pool"], groups, split_of_group)
    for s, t, it, *_ in items:
        taken_norm.setdefault(norm_key(t), set()).add((s, it))
    mix_items = compositions(rng, groups, split_of_group, cluster_of, stats["trivial_pool"],
                             taken_norm)
    items.extend(mix_items)
    earlier = {t for out in parts for s in SPLITS for t in out[s]}
    out, cluster_of_text, n_label_conflict = dedup(items, stats["held_out"], earlier)
    stats["norm_conflicts"] += n_conflicts
    stats["dropped_norm_conflict"] += n_dropped
    stats["dropped_label_conflict"] += n_label_conflict
    stats["mix"] += len(mix_items)
    stats["cluster_of_text"].update(cluster_of_text)
    return out, n_taken


def build(rng, anchors=True):
    """The data of seeds/ and the templates: ({split: {text: intent}}, the shared stats)."""
    stats = new_stats()
    groups = seed_groups(rng, load_seeds())
    groups.extend(template_items(rng))
    out, _ = build_part(rng, groups, [], stats, anchors)
    return out, stats


def added_batches(seed):
    """The batches of seeds/added/, oldest first: its own files (stream "<seed>/added"), then
    each subfolder in name order (stream "<seed>/added/<name>"), as (label, folder, key
    prefix, stream). A new batch in a new subfolder moves no line of the earlier ones."""
    batches = []
    if not os.path.isdir(ADDED_DIR):
        return batches
    if any(f.endswith(".txt") for f in os.listdir(ADDED_DIR)):
        batches.append(("seeds/added/", ADDED_DIR, "added|", "%d/added" % seed))
    for name in sorted(os.listdir(ADDED_DIR)):
        folder = os.path.join(ADDED_DIR, name)
        if os.path.isdir(folder):
            batches.append(("seeds/added/%s/" % name, folder, "added/%s|" % name,
                            "%d/added/%s" % (seed, name)))
    return batches


def build_added(arng, folder, prefix, parts, stats, anchors=True):
    """One batch of added seeds, on its own random stream `arng`, built like the others after
    the earlier `parts`. Returns ({split: {text: intent}}, seeds, texts dropped as
    near-duplicates of earlier lines)."""
    seeds = load_seeds(folder)
    added, n_taken = build_part(arng, seed_groups(arng, seeds, prefix=prefix), parts, stats,
                                anchors)
    return added, len(seeds), n_taken


def check_leaks(parts):
    """No text and no loose key in two splits."""
    seen_split = {}
    norm_split = {}
    for out in parts:
        for s in SPLITS:
            for t in out[s]:
                assert seen_split.setdefault(t, s) == s, \
                    "text in two splits: %r (%s, %s)" % (t, seen_split[t], s)
                k = norm_key(t)
                assert norm_split.setdefault(k, s) == s, "near-duplicate across splits: %r" % t


def write(parts, rngs, out_dir, cluster_of_text):
    """Each split's lines: those of each part (the seeds of seeds/, then each batch of added
    seeds) in the order its own stream shuffles them, part after part."""
    os.makedirs(out_dir, exist_ok=True)
    for s in SPLITS:
        rows = []
        for out, rng in zip(parts, rngs):
            part = sorted(out[s].items(), key=lambda kv: (kv[1], kv[0]))
            rng.shuffle(part)
            rows += part
        path = os.path.join(out_dir, s + ".jsonl")
        with open(path, "w", encoding="utf-8", newline="\n") as f:
            for text, intent in rows:
                f.write(json.dumps({"text": text, "intent": intent}, ensure_ascii=False) + "\n")
        if s == "dev":
            # Calibration folds: a dev line's seed group (for a composition, its request's)
            # decides its fold, so a seed's variants never sit on both sides.
            with open(os.path.join(out_dir, "dev.folds"), "w", encoding="utf-8",
                      newline="\n") as f:
                for text, _ in rows:
                    f.write("%d\n" % (zlib.crc32(cluster_of_text[text].encode()) % 2))


def report(out, stats, batches=()):
    cnt = Counter()
    for s in SPLITS:
        for t, it in out[s].items():
            cnt[(s, it, lang_of(t))] += 1
    header = "| split | intent | ko | en | total |"
    lines = [header, "|---|---|---:|---:|---:|"]
    grand = Counter()
    for s in SPLITS:
        for it in INTENTS:
            ko, en = cnt[(s, it, "ko")], cnt[(s, it, "en")]
            lines.append("| %s | %s | %d | %d | %d |" % (s, it, ko, en, ko + en))
            grand[(it, "ko")] += ko
            grand[(it, "en")] += en
        sko = sum(cnt[(s, it, "ko")] for it in INTENTS)
        sen = sum(cnt[(s, it, "en")] for it in INTENTS)
        lines.append("| %s | **all** | %d | %d | %d |" % (s, sko, sen, sko + sen))
    for it in INTENTS:
        ko, en = grand[(it, "ko")], grand[(it, "en")]
        lines.append("| all | %s | %d | %d | %d |" % (it, ko, en, ko + en))
    tko = sum(v for (it, lg), v in grand.items() if lg == "ko")
    ten = sum(v for (it, lg), v in grand.items() if lg == "en")
    total = tko + ten
    lines.append("| all | **all** | %d | %d | %d |" % (tko, ten, total))
    print("\n".join(lines))
    other = grand[("other", "ko")] + grand[("other", "en")]
    print()
    print("total=%d  other=%.1f%%  english=%.1f%%  mixed(trivial+request)=%d  "
          "dropped: cross-intent near-duplicates=%d, same text two labels=%d"
          % (total, 100.0 * other / total, 100.0 * ten / total, stats["mix"],
             stats["dropped_norm_conflict"], stats["dropped_label_conflict"]))
    for label, added, n_seeds, n_taken in batches:
        print("%s: %d seeds, %d lines; their variants that were near-duplicates of earlier "
              "lines, dropped: %d" % (label, n_seeds, sum(len(added[s]) for s in SPLITS), n_taken))
    return cnt, total, other, ten


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", default=os.path.join(HERE, "data"), help="output directory")
    ap.add_argument("--seed", type=int, default=SEED,
                    help="random seed (augmentation and split); the committed data uses the default")
    ap.add_argument("--no-anchors", action="store_true",
                    help="send every seed group to a split at random, with no anchor of each "
                         "seed family in train (whole families can then be missing from train)")
    args = ap.parse_args(argv)
    rng = random.Random(args.seed)
    out, stats = build(rng, anchors=not args.no_anchors)
    parts, rngs, batches = [out], [rng], []
    for label, folder, prefix, stream in added_batches(args.seed):
        arng = random.Random(stream)  # str seeds hash with SHA-512: deterministic
        added, n_seeds, n_taken = build_added(arng, folder, prefix, parts, stats,
                                              anchors=not args.no_anchors)
        parts.append(added)
        rngs.append(arng)
        batches.append((label, added, n_seeds, n_taken))
    check_leaks(parts)
    write(parts, rngs, args.out, stats["cluster_of_text"])
    both = {s: {t: it for out in parts for t, it in out[s].items()} for s in SPLITS}
    cnt, total, other, ten = report(both, stats, batches)
    # sanity requirements
    assert 15000 <= total <= 45000, total
    for it in TRIVIAL:
        n_train = cnt[("train", it, "ko")] + cnt[("train", it, "en")]
        assert n_train >= 500, (it, n_train)
    for it in INTENTS:
        for lg in ("ko", "en"):
            assert sum(cnt[(s, it, lg)] for s in SPLITS) > 0, (it, lg)
    return 0


if __name__ == "__main__":
    sys.exit(main())
