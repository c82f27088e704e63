//! The three Nexmark event types and their JSON form.
//!
//! Field names, field order and integer widths follow the reference (`com.github.nexmark.flink.model`):
//! ids and prices are Java `long`s (`i64`), texts are strings, and the reference's
//! `java.time.Instant`s are kept as epoch milliseconds (`i64`, suffix `_ms`).
//!
//! The JSON form is the golden files' format: one object, `"type"` first (`"person"`,
//! `"auction"` or `"bid"`), then the reference's camel-case field names in its order, times as
//! integers, no whitespace.

use std::fmt::Write as _;

/// A new person registers (the reference's `Person`).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Person {
    /// Person id, from 1000 up (`GeneratorConfig.FIRST_PERSON_ID`).
    pub id: i64,
    /// "First Last", from two small fixed lists.
    pub name: String,
    /// A random `local@domain.com` address; the local part may hold spaces.
    pub email_address: String,
    /// Four space-separated groups of four digits.
    pub credit_card: String,
    /// One of ten US cities.
    pub city: String,
    /// One of six US state codes.
    pub state: String,
    /// Event time, epoch milliseconds (JSON `dateTime`).
    pub date_time_ms: i64,
    /// Padding that brings the event to its configured average size.
    pub extra: String,
}

/// A person opens an auction (the reference's `Auction`).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Auction {
    /// Auction id, from 1000 up (`GeneratorConfig.FIRST_AUCTION_ID`).
    pub id: i64,
    /// Short random text (JSON `itemName`).
    pub item_name: String,
    /// Longer random text.
    pub description: String,
    /// Opening price, in cents (JSON `initialBid`).
    pub initial_bid: i64,
    /// Reserve price, in cents; never below `initial_bid`.
    pub reserve: i64,
    /// Event time, epoch milliseconds (JSON `dateTime`).
    pub date_time_ms: i64,
    /// Closing time, epoch milliseconds, after `date_time_ms` (JSON `expires`).
    pub expires_ms: i64,
    /// Id of the selling person.
    pub seller: i64,
    /// Category id, 10 to 14.
    pub category: i64,
    /// Padding that brings the event to its configured average size.
    pub extra: String,
}

/// A person bids on an auction (the reference's `Bid`).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Bid {
    /// Id of the auction bid on.
    pub auction: i64,
    /// Id of the bidding person, plus 1000: the reference adds the first person id twice (a
    /// quirk kept), so bidders start at 2000.
    pub bidder: i64,
    /// Price, in cents.
    pub price: i64,
    /// The channel the bid came through: a hot name ("Google", ...) or `channel-<n>`.
    pub channel: String,
    /// The url the bid came from, fixed per channel.
    pub url: String,
    /// Event time, epoch milliseconds (JSON `dateTime`).
    pub date_time_ms: i64,
    /// Padding that brings the event to its configured average size.
    pub extra: String,
}

/// One Nexmark event.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Event {
    /// A new person.
    Person(Person),
    /// A new auction.
    Auction(Auction),
    /// A new bid.
    Bid(Bid),
}

impl Event {
    /// The event time, epoch milliseconds.
    pub fn date_time_ms(&self) -> i64 {
        match self {
            Event::Person(person) => person.date_time_ms,
            Event::Auction(auction) => auction.date_time_ms,
            Event::Bid(bid) => bid.date_time_ms,
        }
    }

    /// The event as one line of the golden format (without a line break).
    pub fn to_json(&self) -> String {
        let mut out = String::with_capacity(512);
        self.write_json(&mut out);
        out
    }

    /// Appends [`Event::to_json`]'s text to `out`, so that a caller that serialises many events
    /// can reuse one buffer.
    pub fn write_json(&self, out: &mut String) {
        let mut object = JsonObject::open(out);
        match self {
            Event::Person(person) => {
                object.string("type", "person");
                object.int("id", person.id);
                object.string("name", &person.name);
                object.string("emailAddress", &person.email_address);
                object.string("creditCard", &person.credit_card);
                object.string("city", &person.city);
                object.string("state", &person.state);
                object.int("dateTime", person.date_time_ms);
                object.string("extra", &person.extra);
            }
            Event::Auction(auction) => {
                object.string("type", "auction");
                object.int("id", auction.id);
                object.string("itemName", &auction.item_name);
                object.string("description", &auction.description);
                object.int("initialBid", auction.initial_bid);
                object.int("reserve", auction.reserve);
                object.int("dateTime", auction.date_time_ms);
                object.int("expires", auction.expires_ms);
                object.int("seller", auction.seller);
                object.int("category", auction.category);
                object.string("extra", &auction.extra);
            }
            Event::Bid(bid) => {
                object.string("type", "bid");
                object.int("auction", bid.auction);
                object.int("bidder", bid.bidder);
                object.int("price", bid.price);
                object.string("channel", &bid.channel);
                object.string("url", &bid.url);
                object.int("dateTime", bid.date_time_ms);
                object.string("extra", &bid.extra);
            }
        }
        object.close();
    }
}

/// Writes one flat JSON object, member by member, with no whitespace.
struct JsonObject<'a> {
    out: &'a mut String,
    empty: bool,
}

impl<'a> JsonObject<'a> {
    fn open(out: &'a mut String) -> Self {
        out.push('{');
        Self { out, empty: true }
    }

    fn key(&mut self, key: &str) {
        if !self.empty {
            self.out.push(',');
        }
        self.empty = false;
        push_json_string(self.out, key);
        self.out.push(':');
    }

    fn int(&mut self, key: &str, value: i64) {
        self.key(key);
        // Writing into a `String` cannot fail.
        let _ = write!(self.out, "{value}");
    }

    fn string(&mut self, key: &str, value: &str) {
        self.key(key);
        push_json_string(self.out, value);
    }

    fn close(self) {
        self.out.push('}');
    }
}

/// Appends `text` as a JSON string literal: quotes and backslashes escaped, control characters
/// as their short escapes or `\u00XX`, everything else (including non-ASCII) verbatim.
fn push_json_string(out: &mut String, text: &str) {
    out.push('"');
    for c in text.chars() {
        match c {
            '"' => out.push_str("\\\""),
            '\\' => out.push_str("\\\\"),
            '\n' => out.push_str("\\n"),
            '\r' => out.push_str("\\r"),
            '\t' => out.push_str("\\t"),
            '\u{08}' => out.push_str("\\b"),
            '\u{0C}' => out.push_str("\\f"),
            c if u32::from(c) < 0x20 => {
                let _ = write!(out, "\\u{:04x}", u32::from(c));
            }
            c => out.push(c),
        }
    }
    out.push('"');
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn json_strings_are_escaped() {
        let mut out = String::new();
        push_json_string(&mut out, "a\"b\\c\n\u{01}é");
        assert_eq!(out, r#""a\"b\\c\n\u0001é""#);
    }

    #[test]
    fn bid_json_has_type_first_and_reference_field_order() {
        let bid = Event::Bid(Bid {
            auction: 1000,
            bidder: 2001,
            price: 32_530_001,
            channel: "Google".to_owned(),
            url: "https://www.nexmark.com/a/b/c/item.htm?query=1".to_owned(),
            date_time_ms: 1_436_918_400_000,
            extra: "X[\\".to_owned(),
        });
        assert_eq!(
            bid.to_json(),
            concat!(
                r#"{"type":"bid","auction":1000,"bidder":2001,"price":32530001,"#,
                r#""channel":"Google","url":"https://www.nexmark.com/a/b/c/item.htm?query=1","#,
                r#""dateTime":1436918400000,"extra":"X[\\"}"#
            )
        );
    }
}
