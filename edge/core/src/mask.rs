//! Masking of personal data before a message leaves the edge.
//!
//! The users are children. Phone numbers, Korean resident registration numbers, card
//! numbers, e-mail addresses, street addresses (Korean road-name and lot-number forms,
//! apartment unit numbers, English house-number streets) and any other run of nine or more
//! digits are replaced by a bracketed label before text reaches Pub/Sub, Firestore or a log.
//! Hand-written scanners instead of a regex engine keep the Worker small.

/// Labels written in place of what was found.
pub const EMAIL: &str = "[email]";
pub const PHONE: &str = "[phone]";
pub const RRN: &str = "[rrn]";
pub const CARD: &str = "[card]";
pub const ADDRESS: &str = "[address]";
pub const NUMBER: &str = "[number]";

type Span = (usize, usize, &'static str);

/// `text` with personal data replaced by labels. Idempotent; total over any input.
pub fn mask(text: &str) -> String {
    let chars: Vec<char> = text.chars().collect();
    // The scanners read full-width forms (what Korean and Japanese IMEs type: `０１０－`,
    // `＠`, `．`, the ideographic space) and other dashes as their ASCII selves, one character
    // for one, so a span found in the folded text is the same span of the original.
    let folded: Vec<char> = chars.iter().map(|&c| fold(c)).collect();
    let mut spans = Vec::new();
    emails(&folded, &mut spans);
    addresses(&folded, &mut spans);
    numbers(&folded, &mut spans);
    spans.sort_by_key(|&(s, e, _)| (s, usize::MAX - e));
    let mut out = String::with_capacity(text.len());
    let mut at = 0;
    for (s, e, label) in spans {
        if s < at {
            continue; // overlaps an earlier, longer span
        }
        out.extend(&chars[at..s]);
        out.push_str(label);
        at = e;
    }
    out.extend(&chars[at..]);
    out
}

/// A full-width ASCII form as its ASCII character, the ideographic space as a space, and the
/// Unicode dashes and minus sign as `-`; any other character as it is.
fn fold(c: char) -> char {
    match c {
        '\u{FF01}'..='\u{FF5E}' => char::from_u32(c as u32 - 0xFEE0).unwrap_or(c),
        '\u{3000}' => ' ',
        '\u{2010}'..='\u{2015}' | '\u{2212}' | '\u{FE63}' => '-',
        _ => c,
    }
}

/// An ASCII digit's value (the scanners see full-width digits [`fold`]ed to ASCII).
fn digit(c: char) -> Option<u8> {
    c.is_ascii_digit().then(|| c as u8 - b'0')
}

fn is_hangul(c: char) -> bool {
    ('가'..='힣').contains(&c)
}

fn emails(c: &[char], spans: &mut Vec<Span>) {
    // An ASCII name ends at the first other character (`이메일은kid@…` keeps its Korean); a
    // name in another script (`철수@naver.com`, allowed by internationalized mail) is read
    // in it, letters and digits of any script.
    let ascii_local = |x: char| x.is_ascii_alphanumeric() || "._%+-".contains(x);
    let any_local = |x: char| x.is_alphanumeric() || "._%+-".contains(x);
    let domain = |x: char| x.is_ascii_alphanumeric() || x == '-' || x == '.';
    for (i, &ch) in c.iter().enumerate() {
        if ch != '@' {
            continue;
        }
        let local: &dyn Fn(char) -> bool = match i.checked_sub(1).map(|p| c[p]) {
            Some(before) if !before.is_ascii() => &any_local,
            _ => &ascii_local,
        };
        let mut s = i;
        while s > 0 && local(c[s - 1]) {
            s -= 1;
        }
        let mut e = i + 1;
        while e < c.len() && domain(c[e]) {
            e += 1;
        }
        while e > i + 1 && c[e - 1] == '.' {
            e -= 1;
        }
        let dom: String = c[i + 1..e].iter().collect();
        let tld_ok = dom.rsplit_once('.').is_some_and(|(host, tld)| {
            !host.is_empty() && tld.len() >= 2 && tld.chars().all(|x| x.is_ascii_alphabetic())
        });
        if s < i && tld_ok {
            spans.push((s, e, EMAIL));
        }
    }
}

/// Runs of digits joined by separators (white space, `-`, `.`, `/`, `_`, parentheses; up to
/// three in a row, as in `010 - 1234 - 5678`), with an optional leading `+`.
fn numbers(c: &[char], spans: &mut Vec<Span>) {
    let sep = |x: char| x.is_whitespace() || matches!(x, '-' | '.' | '/' | '_' | '(' | ')');
    let mut i = 0;
    while i < c.len() {
        let start_ok = digit(c[i]).is_some()
            || (matches!(c[i], '+' | '(') && c.get(i + 1).is_some_and(|&x| digit(x).is_some()));
        if !start_ok {
            i += 1;
            continue;
        }
        let start = i;
        let plus = c[i] == '+';
        let mut groups: Vec<String> = vec![String::new()];
        let mut end = i;
        let mut j = i;
        let mut seps = 0;
        while j < c.len() {
            if let Some(d) = digit(c[j]) {
                if let Some(g) = groups.last_mut() {
                    g.push((b'0' + d) as char);
                }
                seps = 0;
                end = j + 1;
            } else if sep(c[j]) || (j == start && plus) {
                seps += 1;
                if seps > 3 {
                    break;
                }
                if groups.last().is_some_and(|g| !g.is_empty()) {
                    groups.push(String::new());
                }
            } else {
                break;
            }
            j += 1;
        }
        groups.retain(|g| !g.is_empty());
        let digits: String = groups.concat();
        if let Some(label) = classify_number(&digits, &groups, plus, &c[start..end]) {
            spans.push((start, end, label));
        }
        i = end.max(i + 1);
    }
}

fn classify_number(d: &str, groups: &[String], plus: bool, raw: &[char]) -> Option<&'static str> {
    let n = d.len();
    let lens: Vec<usize> = groups.iter().map(String::len).collect();
    let b = d.as_bytes();
    if plus && n >= 8 {
        return Some(PHONE);
    }
    let rrn_date = n == 13
        && (b[2] == b'0' || b[2] == b'1')
        && (b'1'..=b'8').contains(&b[6])
        && matches!(
            &d[2..4],
            "01" | "02" | "03" | "04" | "05" | "06" | "07" | "08" | "09" | "10" | "11" | "12"
        );
    if (lens == [6, 7] && (b'1'..=b'8').contains(&b[6])) || (lens == [13] && rrn_date) {
        return Some(RRN);
    }
    if (13..=19).contains(&n) && (luhn(d) || lens == [4, 4, 4, 4]) {
        return Some(CARD);
    }
    let korean_phone = b[0] == b'0' && (9..=11).contains(&n);
    let service_phone = n == 8 && lens == [4, 4] && matches!(&d[..2], "15" | "16" | "18");
    let us_phone = (n == 10 && (lens == [3, 3, 4] || raw.first() == Some(&'(')))
        || (n == 11 && b[0] == b'1' && lens == [1, 3, 3, 4]);
    if korean_phone || service_phone || us_phone {
        return Some(PHONE);
    }
    (n >= 9).then_some(NUMBER)
}

fn luhn(d: &str) -> bool {
    let sum: u32 = d
        .bytes()
        .rev()
        .enumerate()
        .map(|(i, c)| {
            let v = u32::from(c - b'0');
            if i % 2 == 1 {
                if v * 2 > 9 { v * 2 - 9 } else { v * 2 }
            } else {
                v
            }
        })
        .sum();
    sum.is_multiple_of(10)
}

/// Whitespace-separated tokens as char ranges.
fn tokens(c: &[char]) -> Vec<(usize, usize)> {
    let mut out = Vec::new();
    let mut i = 0;
    while i < c.len() {
        if c[i].is_whitespace() {
            i += 1;
            continue;
        }
        let s = i;
        while i < c.len() && !c[i].is_whitespace() {
            i += 1;
        }
        out.push((s, i));
    }
    out
}

/// Trims trailing punctuation from a token range.
fn trim_punct(c: &[char], (s, mut e): (usize, usize)) -> (usize, usize) {
    while e > s && (c[e - 1].is_ascii_punctuation() || "，。！？".contains(c[e - 1])) {
        e -= 1;
    }
    (s, e)
}

/// The length of a house number at the start of `t` (`123`, `123-45`, `12번지`, `1203호`,
/// `221B`), when what follows it is nothing or a Korean particle (`34에`, `110이야`).
fn house_number_len(t: &[char]) -> Option<usize> {
    const PARTICLES: &[&str] = &[
        "",
        "에",
        "에서",
        "이야",
        "야",
        "이고",
        "이에요",
        "예요",
        "이요",
        "요",
        "입니다",
        "으로",
        "로",
        "쪽",
        "근처",
        "이",
    ];
    let digits = |from: usize| {
        t[from..]
            .iter()
            .take_while(|&&x| digit(x).is_some())
            .count()
    };
    let mut n = digits(0);
    if n == 0 {
        return None;
    }
    if t.get(n) == Some(&'-') && digits(n + 1) > 0 {
        n += 1 + digits(n + 1);
    }
    let rest: String = t[n..].iter().collect();
    for unit in ["번지", "번", "호", "층", "동"] {
        if let Some(after) = rest.strip_prefix(unit)
            && PARTICLES.contains(&after)
        {
            return Some(n + unit.chars().count());
        }
    }
    if let Some(&x) = t.get(n)
        && x.is_ascii_alphabetic()
        && t.len() == n + 1
    {
        return Some(n + 1);
    }
    PARTICLES.contains(&rest.as_str()).then_some(n)
}

fn addresses(c: &[char], spans: &mut Vec<Span>) {
    const STREET: &[&str] = &[
        "street",
        "st",
        "avenue",
        "ave",
        "road",
        "rd",
        "boulevard",
        "blvd",
        "lane",
        "ln",
        "drive",
        "dr",
        "way",
        "court",
        "ct",
        "place",
        "pl",
    ];
    let toks = tokens(c);
    for (k, &tok) in toks.iter().enumerate() {
        let (s, e) = trim_punct(c, tok);
        let t = &c[s..e];
        if t.is_empty() {
            continue;
        }
        let next = toks.get(k + 1).map(|&r| trim_punct(c, r));
        let last = *t.last().unwrap_or(&' ');
        // Korean road names (…로, …길, …번길) and lots (…동, …리, …가) followed by a number;
        // the number may also be glued on (`테헤란로123`).
        let hangul_name = t.len() >= 2 && t.iter().filter(|&&x| is_hangul(x)).count() >= 2;
        let next_number = next.and_then(|(ns, ne)| Some((ns, house_number_len(&c[ns..ne])?)));
        if hangul_name && let Some((ns, len)) = next_number {
            let number = &c[ns..ns + len];
            let lot_like = len >= 2 || number.contains(&'-');
            if matches!(last, '로' | '길') || (matches!(last, '동' | '리' | '가') && lot_like)
            {
                spans.push((s, ns + len, ADDRESS));
                continue;
            }
        }
        if let Some(p) = t.iter().position(|&x| x == '로' || x == '길')
            && p >= 1
            && t[..p].iter().all(|&x| is_hangul(x))
            && let Some(len) = house_number_len(&t[p + 1..])
        {
            spans.push((s, s + p + 1 + len, ADDRESS));
            continue;
        }
        // Apartment units: `101동 1203호`.
        if t.len() >= 2
            && last == '동'
            && t[..t.len() - 1].iter().all(|&x| digit(x).is_some())
            && let Some((ns, len)) = next_number
            && c[ns + len - 1] == '호'
        {
            spans.push((s, ns + len, ADDRESS));
            continue;
        }
        // English: `221B Baker Street`, `123 N Main St.`.
        if house_number_len(t) == Some(t.len()) && t.iter().all(|x| x.is_ascii_alphanumeric()) {
            for span in 1..=4 {
                let Some(&(ws, we)) = toks.get(k + span) else {
                    break;
                };
                let (ws, we) = trim_punct(c, (ws, we));
                let w: String = c[ws..we].iter().collect();
                if w.is_empty() || !w.chars().all(|x| x.is_ascii_alphabetic()) {
                    break;
                }
                if span > 1 && STREET.contains(&w.to_ascii_lowercase().as_str()) {
                    let end = if c.get(we) == Some(&'.') { we + 1 } else { we };
                    spans.push((s, end, ADDRESS));
                    break;
                }
                if !w.starts_with(|x: char| x.is_ascii_uppercase()) {
                    break;
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn masks_each_kind_in_korean_and_english_formats() {
        let cases = [
            // phones
            ("내 번호는 010-1234-5678 이야", "내 번호는 [phone] 이야"),
            ("01012345678로 연락줘", "[phone]로 연락줘"),
            ("010 1234 5678", "[phone]"),
            ("집 전화 02-123-4567", "집 전화 [phone]"),
            ("031-987-6543 으로", "[phone] 으로"),
            ("+82 10-1234-5678", "[phone]"),
            ("고객센터 1588-1234", "고객센터 [phone]"),
            ("call me at (555) 123-4567", "call me at [phone]"),
            ("my number is 555-123-4567.", "my number is [phone]."),
            ("+1 555 123 4567", "[phone]"),
            // resident registration numbers
            ("주민번호 090101-3123456", "주민번호 [rrn]"),
            ("0901013123456", "[rrn]"),
            // cards
            ("카드번호 1234-5678-9012-3456", "카드번호 [card]"),
            ("card 4111 1111 1111 1111 please", "card [card] please"),
            ("4111111111111111", "[card]"),
            // e-mail
            ("메일은 kid.kim+food@example.co.kr 로", "메일은 [email] 로"),
            ("email me: Jane_Doe@mail.example.com.", "email me: [email]."),
            // addresses
            (
                "서울 강남구 테헤란로 123 근처 맛집",
                "서울 강남구 [address] 근처 맛집",
            ),
            ("중앙로12길 34에 살아", "[address]에 살아"),
            ("세종대로 110, 거기", "[address], 거기"),
            ("역삼동 123-45 살아요", "[address] 살아요"),
            ("우리집 101동 1203호야", "우리집 [address]야"),
            (
                "I live at 221B Baker Street, London",
                "I live at [address], London",
            ),
            (
                "near 1600 Amphitheatre Pkwy? no, 123 N Main St.",
                "near 1600 Amphitheatre Pkwy? no, [address]",
            ),
            // other long numbers
            ("계좌 110-123-456789", "계좌 [number]"),
            // separators as people type them: spaced dashes, doubled spaces, slashes,
            // underscores, line breaks, full-width forms and other dashes
            ("010 - 1234 - 5678", "[phone]"),
            ("010  1234  5678 이야", "[phone] 이야"),
            ("010/1234/5678", "[phone]"),
            ("010_1234_5678", "[phone]"),
            ("번호\n010\n1234\n5678", "번호\n[phone]"),
            ("０１０－１２３４－５６７８", "[phone]"),
            ("010　1234　5678", "[phone]"),
            ("010‐1234−5678", "[phone]"),
            ("900101 - 3123456", "[rrn]"),
            // e-mail: a name in Hangul, full-width forms, a name glued to Korean words
            ("철수@naver.com 으로 보내", "[email] 으로 보내"),
            ("ｋｉｄ＠ｎａｖｅｒ．ｃｏｍ", "[email]"),
            ("이메일은kid@naver.com이에요", "이메일은[email]이에요"),
        ];
        for (input, want) in cases {
            assert_eq!(mask(input), want, "{input}");
        }
    }

    #[test]
    fn ordinary_text_is_untouched() {
        for s in [
            "안녕! 근처 짜장면집 추천해줘",
            "3000원 이하 메뉴 있어? 2명이서 갈거야",
            "2024-12-25 크리스마스에 뭐 먹지",
            "오후 3시 30분에 만나",
            "I have 2 coupons and 15 dollars",
            "2024/12/25에 만나",
            "12/25 크리스마스",
            "1. 짜장면\n2. 짬뽕\n3. 탕수육",
            "what can you do?",
            "종로 맛집 알려줘",
            "",
            "ㅎㅇ",
        ] {
            assert_eq!(mask(s), s);
        }
    }

    #[test]
    fn masking_is_idempotent_and_total() {
        for s in [
            "010-1234-5678 a@b.co 테헤란로 123",
            "@@@",
            "+",
            "(",
            "1-",
            "٣٣٣",
            "\u{202e}010 1234 5678",
        ] {
            let once = mask(s);
            assert_eq!(mask(&once), once, "{s}");
        }
    }
}
