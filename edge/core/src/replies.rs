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
pub fn reply(intent: &str, locale: Locale) -> Option<&'static str> {
    Some(match (intent, locale) {
        ("greeting", Locale::Ko) => {
            "안녕하세요! 급식카드로 갈 수 있는 맛집을 찾아 드릴게요. 어디 근처에서 무엇을 먹고 싶은지 말해 주세요."
        }
        ("greeting", Locale::En) => {
            "Hi! I can find places near you that take your meal card. Tell me where you are and what you'd like to eat."
        }
        ("thanks", Locale::Ko) => "천만에요! 또 궁금한 게 있으면 언제든지 물어봐 주세요.",
        ("thanks", Locale::En) => "You're welcome! Ask me any time you need another idea.",
        ("goodbye", Locale::Ko) => "안녕히 가세요! 맛있게 먹고 또 만나요.",
        ("goodbye", Locale::En) => "Bye! Enjoy your meal, and see you next time.",
        ("help", Locale::Ko) => {
            "저는 급식카드(아동급식카드)를 쓸 수 있는 근처 식당을 추천해 드려요. 예: \"강남역 근처 김밥집 알려줘\", \"만 원 이하로 먹을 수 있는 곳 있어?\" 처럼 물어보세요."
        }
        ("help", Locale::En) => {
            "I recommend nearby restaurants that accept the children's meal card. Try \"kimbap near Gangnam Station\" or \"somewhere under 10,000 won\"."
        }
        ("identity", Locale::Ko) => {
            "저는 아동급식카드 가맹 식당을 추천해 주는 챗봇이에요. 사람은 아니지만 맛집 찾기는 자신 있어요!"
        }
        ("identity", Locale::En) => {
            "I'm a chatbot that recommends restaurants accepting the children's meal card. Not a person, but good at finding food!"
        }
        _ => return None,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_trivial_intent_has_a_reply_in_both_languages() {
        for intent in shared::intent::TRIVIAL_INTENTS {
            for locale in [Locale::Ko, Locale::En] {
                assert!(reply(intent, locale).is_some(), "{intent} {locale:?}");
            }
        }
        assert_eq!(reply("other", Locale::Ko), None);
    }

    #[test]
    fn locale_detection() {
        assert_eq!(Locale::detect("ㅎㅇ"), Locale::Ko);
        assert_eq!(Locale::detect("안녕"), Locale::Ko);
        assert_eq!(Locale::detect("hi 🙂"), Locale::En);
    }
}
