//! Canned replies for the trivial intents, in Korean and English.

/// A supported reply language.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Locale {
    Ko,
    En,
}

impl Locale {
    pub fn parse(s: &str) -> Option<Self> {
        match s {
            "ko" => Some(Self::Ko),
            "en" => Some(Self::En),
            _ => None,
        }
    }

    pub fn as_str(self) -> &'static str {
        match self {
            Self::Ko => "ko",
            Self::En => "en",
        }
    }

    /// Korean when the message has any Hangul (syllables or jamo), else English.
    pub fn detect(message: &str) -> Self {
        let hangul = |c: char| {
            ('가'..='힣').contains(&c) || ('ㄱ'..='ㆎ').contains(&c) || ('ᄀ'..='ᇿ').contains(&c)
        };
        if message.chars().any(hangul) {
            Self::Ko
        } else {
            Self::En
        }
    }
}

/// The reply for a trivial `intent`, or `None` for an intent the edge never answers.
///
/// Each intent has a few variants per language; which one is picked depends only on the
/// message, so the same message always gets the same reply (retries and tests see no change).
pub fn reply(intent: &str, locale: Locale, message: &str) -> Option<&'static str> {
    let variants = variants(intent, locale)?;
    // FNV-1a over the message's bytes.
    let hash = message.bytes().fold(0xcbf2_9ce4_8422_2325u64, |h, b| {
        (h ^ u64::from(b)).wrapping_mul(0x0000_0100_0000_01b3)
    });
    variants
        .get((hash % variants.len() as u64) as usize)
        .copied()
}

/// Every reply of a trivial `intent` in `locale`: friendly, short, suitable for children, and
/// never asking for personal data.
pub fn variants(intent: &str, locale: Locale) -> Option<&'static [&'static str]> {
    Some(match (intent, locale) {
        ("greeting", Locale::Ko) => &[
            "안녕하세요! 급식카드로 갈 수 있는 맛집을 찾아 드릴게요. 어느 동네에서 무엇을 먹고 싶은지 말해 주세요.",
            "반가워요! 오늘은 뭐가 먹고 싶어요? 동네 이름이랑 먹고 싶은 음식을 알려 주면 급식카드 되는 곳을 찾아 볼게요.",
            "안녕! 배고플 땐 저를 불러 주세요. 어느 근처에서 어떤 음식을 찾는지 말해 주면 급식카드로 갈 수 있는 곳을 알려 줄게요.",
        ],
        ("greeting", Locale::En) => &[
            "Hi! I can find places near you that take your meal card. Tell me the area and what you'd like to eat.",
            "Hello! What are you hungry for today? Tell me the area and the food, and I'll look for places that take your meal card.",
            "Hey there! Tell me an area and a food you like, and I'll find spots where your meal card works.",
        ],
        ("thanks", Locale::Ko) => &[
            "천만에요! 또 궁금한 게 있으면 언제든지 물어봐 주세요.",
            "도움이 됐다니 기뻐요! 맛있게 먹어요.",
            "별말씀을요! 다른 메뉴가 궁금하면 또 물어봐 주세요.",
        ],
        ("thanks", Locale::En) => &[
            "You're welcome! Ask me any time you need another idea.",
            "Happy to help! Enjoy your meal.",
            "Any time! Come back whenever you want another idea.",
        ],
        ("goodbye", Locale::Ko) => &[
            "안녕히 가세요! 맛있게 먹고 또 만나요.",
            "잘 가요! 배고플 때 또 찾아 주세요.",
            "다음에 또 만나요! 맛있는 식사 하세요.",
        ],
        ("goodbye", Locale::En) => &[
            "Bye! Enjoy your meal, and see you next time.",
            "See you! Come back whenever you're hungry.",
            "Take care! Have a tasty day.",
        ],
        ("help", Locale::Ko) => &[
            "저는 급식카드(아동급식카드)를 쓸 수 있는 근처 식당을 추천해 드려요. 예: \"강남역 근처 김밥집 알려줘\", \"만 원 이하로 먹을 수 있는 곳 있어?\" 처럼 물어보세요.",
            "급식카드로 먹을 수 있는 식당을 찾아 드려요. \"학교 근처 떡볶이집 있어?\"나 \"지금 문 연 분식집 알려줘\"처럼 물어보면 돼요.",
            "먹고 싶은 음식과 동네를 말해 주면 급식카드 되는 곳을 골라 드려요. 예: \"홍대 근처 돈까스\", \"싸고 맛있는 점심 추천해줘\".",
        ],
        ("help", Locale::En) => &[
            "I recommend nearby restaurants that accept the children's meal card. Try \"kimbap near Gangnam Station\" or \"somewhere under 10,000 won\".",
            "I find places where your meal card works. Ask things like \"tteokbokki near my school\" or \"what's open now?\".",
            "Tell me a food and an area and I'll pick places that take the meal card, e.g. \"pork cutlet in Hongdae\" or \"a cheap, tasty lunch\".",
        ],
        ("identity", Locale::Ko) => &[
            "저는 아동급식카드 가맹 식당을 추천해 주는 챗봇이에요. 사람은 아니지만 맛집 찾기는 자신 있어요!",
            "저는 급식카드로 갈 수 있는 식당을 찾아 주는 AI 챗봇이에요. 먹고 싶은 게 있으면 말해 주세요!",
            "저는 사람이 아니라 챗봇이에요. 급식카드 되는 맛있는 곳을 찾아 드리는 게 제 일이에요.",
        ],
        ("identity", Locale::En) => &[
            "I'm a chatbot that recommends restaurants accepting the children's meal card. Not a person, but good at finding food!",
            "I'm an AI chatbot that finds places where you can use your meal card. Tell me what you'd like to eat!",
            "I'm a chatbot, not a person. My job is finding tasty places that take the meal card.",
        ],
        _ => return None,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_trivial_intent_has_a_few_replies_in_both_languages() {
        for intent in shared::intent::TRIVIAL_INTENTS {
            for locale in [Locale::Ko, Locale::En] {
                let v = variants(intent, locale).unwrap_or_default();
                assert!(v.len() >= 3, "{intent} {locale:?}: {v:?}");
                let distinct: std::collections::HashSet<_> = v.iter().collect();
                assert_eq!(
                    distinct.len(),
                    v.len(),
                    "{intent} {locale:?}: a repeated variant"
                );
                for r in v {
                    // Korean replies are in Korean, English ones have no Hangul.
                    assert_eq!(Locale::detect(r), locale, "{intent}: {r}");
                    assert!(
                        r.chars().count() <= 150,
                        "{intent}: too long for a child: {r}"
                    );
                }
            }
        }
        assert_eq!(variants("other", Locale::Ko), None);
        assert_eq!(reply("other", Locale::Ko, "짜장면"), None);
    }

    #[test]
    fn the_same_message_gets_the_same_reply_and_messages_see_every_variant() {
        let messages = [
            "안녕",
            "안녕!",
            "안녕하세요",
            "하이",
            "ㅎㅇ",
            "hello",
            "hi",
            "hey",
        ];
        let mut seen = std::collections::HashSet::new();
        for m in messages {
            let r = reply("greeting", Locale::Ko, m);
            assert_eq!(r, reply("greeting", Locale::Ko, m), "{m}");
            seen.insert(r);
        }
        assert_eq!(
            seen.len(),
            3,
            "8 greetings should reach all 3 variants: {seen:?}"
        );
    }

    #[test]
    fn locale_detection() {
        assert_eq!(Locale::detect("ㅎㅇ"), Locale::Ko);
        assert_eq!(Locale::detect("안녕"), Locale::Ko);
        assert_eq!(Locale::detect("hi 🙂"), Locale::En);
    }
}
