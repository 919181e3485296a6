/*
 * json_lite.h — a deliberately small JSON reader for the hybridtrt engine sidecar.
 *
 * Reads UTF-8 JSON into a tree of JsonValue (null, bool, number, string, array, object). It
 * supports exactly what `model.engine.json` uses: no comments, \uXXXX escapes only in the Basic
 * Multilingual Plane, numbers as double. Errors throw std::runtime_error with the byte offset.
 * Written for this example; not a general-purpose library.
 */
#pragma once

#include <cstdint>
#include <map>
#include <memory>
#include <stdexcept>
#include <string>
#include <vector>

namespace json_lite
{

class JsonValue
{
public:
    enum class Kind
    {
        kNULL,
        kBOOL,
        kNUMBER,
        kSTRING,
        kARRAY,
        kOBJECT
    };

    Kind kind{Kind::kNULL};
    bool boolean{false};
    double number{0.0};
    std::string string;
    std::vector<JsonValue> array;
    std::map<std::string, JsonValue> object;

    bool isNull() const { return kind == Kind::kNULL; }
    bool isString() const { return kind == Kind::kSTRING; }
    bool isNumber() const { return kind == Kind::kNUMBER; }

    //! Member of an object; throws when absent or when this is not an object.
    JsonValue const& operator[](std::string const& key) const
    {
        if (kind != Kind::kOBJECT)
        {
            throw std::runtime_error("json: '" + key + "' looked up in a non-object");
        }
        auto it = object.find(key);
        if (it == object.end())
        {
            throw std::runtime_error("json: missing key '" + key + "'");
        }
        return it->second;
    }
    bool has(std::string const& key) const { return kind == Kind::kOBJECT && object.count(key) > 0; }
    JsonValue const& at(size_t i) const { return array.at(i); }
    size_t size() const { return kind == Kind::kARRAY ? array.size() : object.size(); }
    int64_t asInt() const
    {
        if (kind != Kind::kNUMBER)
        {
            throw std::runtime_error("json: expected a number");
        }
        return static_cast<int64_t>(number);
    }
    std::string const& asString() const
    {
        if (kind != Kind::kSTRING)
        {
            throw std::runtime_error("json: expected a string");
        }
        return string;
    }
};

class Parser
{
public:
    explicit Parser(std::string const& text)
        : mText(text)
    {
    }

    JsonValue parse()
    {
        JsonValue v = value();
        skipSpace();
        if (mPos != mText.size())
        {
            fail("trailing characters");
        }
        return v;
    }

private:
    std::string const& mText;
    size_t mPos{0};

    [[noreturn]] void fail(std::string const& what) const
    {
        throw std::runtime_error("json: " + what + " at byte " + std::to_string(mPos));
    }

    void skipSpace()
    {
        while (mPos < mText.size() && (mText[mPos] == ' ' || mText[mPos] == '\n' || mText[mPos] == '\r' || mText[mPos] == '\t'))
        {
            ++mPos;
        }
    }

    char peek()
    {
        skipSpace();
        if (mPos >= mText.size())
        {
            fail("unexpected end");
        }
        return mText[mPos];
    }

    void expect(char c)
    {
        if (peek() != c)
        {
            fail(std::string("expected '") + c + "'");
        }
        ++mPos;
    }

    bool consumeWord(char const* word)
    {
        std::string w(word);
        if (mText.compare(mPos, w.size(), w) == 0)
        {
            mPos += w.size();
            return true;
        }
        return false;
    }

    JsonValue value()
    {
        JsonValue v;
        char c = peek();
        if (c == '{')
        {
            v.kind = JsonValue::Kind::kOBJECT;
            ++mPos;
            if (peek() == '}')
            {
                ++mPos;
                return v;
            }
            while (true)
            {
                std::string key = stringLiteral();
                expect(':');
                v.object.emplace(std::move(key), value());
                if (peek() == ',')
                {
                    ++mPos;
                    continue;
                }
                expect('}');
                return v;
            }
        }
        if (c == '[')
        {
            v.kind = JsonValue::Kind::kARRAY;
            ++mPos;
            if (peek() == ']')
            {
                ++mPos;
                return v;
            }
            while (true)
            {
                v.array.push_back(value());
                if (peek() == ',')
                {
                    ++mPos;
                    continue;
                }
                expect(']');
                return v;
            }
        }
        if (c == '"')
        {
            v.kind = JsonValue::Kind::kSTRING;
            v.string = stringLiteral();
            return v;
        }
        if (consumeWord("null"))
        {
            return v;
        }
        if (consumeWord("true") || consumeWord("false"))
        {
            v.kind = JsonValue::Kind::kBOOL;
            v.boolean = mText[mPos - 1] == 'e' && mText[mPos - 2] == 'u';
            return v;
        }
        size_t start = mPos;
        while (mPos < mText.size() && std::string("+-0123456789.eE").find(mText[mPos]) != std::string::npos)
        {
            ++mPos;
        }
        if (start == mPos)
        {
            fail("unexpected character");
        }
        v.kind = JsonValue::Kind::kNUMBER;
        v.number = std::stod(mText.substr(start, mPos - start));
        return v;
    }

    std::string stringLiteral()
    {
        expect('"');
        std::string out;
        while (mPos < mText.size() && mText[mPos] != '"')
        {
            char c = mText[mPos++];
            if (c != '\\')
            {
                out += c;
                continue;
            }
            if (mPos >= mText.size())
            {
                fail("bad escape");
            }
            char e = mText[mPos++];
            switch (e)
            {
            case 'n': out += '\n'; break;
            case 't': out += '\t'; break;
            case 'r': out += '\r'; break;
            case 'b': out += '\b'; break;
            case 'f': out += '\f'; break;
            case 'u':
            {
                if (mPos + 4 > mText.size())
                {
                    fail("bad \\u escape");
                }
                unsigned code = static_cast<unsigned>(std::stoul(mText.substr(mPos, 4), nullptr, 16));
                mPos += 4;
                if (code < 0x80)
                {
                    out += static_cast<char>(code);
                }
                else if (code < 0x800)
                {
                    out += static_cast<char>(0xC0 | (code >> 6));
                    out += static_cast<char>(0x80 | (code & 0x3F));
                }
                else
                {
                    out += static_cast<char>(0xE0 | (code >> 12));
                    out += static_cast<char>(0x80 | ((code >> 6) & 0x3F));
                    out += static_cast<char>(0x80 | (code & 0x3F));
                }
                break;
            }
            default: out += e; break; // \" \\ \/
            }
        }
        if (mPos >= mText.size())
        {
            fail("unterminated string");
        }
        ++mPos;
        return out;
    }
};

inline JsonValue parse(std::string const& text)
{
    return Parser(text).parse();
}

} // namespace json_lite
